"""Execute the notebooks in place and save them with their outputs (tables and plots), so they read
on the repository page as they ran. Full runs (not the test suite's quick mode):

    python notebooks/execute.py            # every notebook, about 2 minutes on 2 idle CPU cores
    python notebooks/execute.py demo_frontier.ipynb
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "MPSEARCH_NOTEBOOK_QUICK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        env["MPSEARCH_NOTEBOOK_OUT"] = str(Path(tmp) / "demo")
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                                    resources={"metadata": {"path": tmp}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print(f"executed and saved {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        execute(HERE / name)
