"""Export a surgical model to a Hugging Face directory that transformers can load.

Layout of the directory:
    config.json          the base model's config plus `ultrametric_surgery` (the full
                         SurgeryConfig) and `ultrametric_export` (router file, provenance)
    model*.safetensors   the base weights exactly as the run loaded them (same dtype, same bits)
    router.safetensors   the routers, float32, named model.layers.N.self_attn.router.fc1.weight
                         etc. in torch layout ([out, in])
    tokenizer files      when the base model's tokenizer is known
    README.md            how to load it

A plain `AutoModelForCausalLM.from_pretrained(dir)` loads the dense base model and ignores the
router file; `ultrametric_jax.pytorch.surgical_llama.load_surgical_llama(dir)` loads the surgical
model, and `load_surgical_export(dir)` loads it back in JAX (evaluation mode).

The pipeline (`ultrametric_jax.run.pipeline.export_run`) rebuilds a run's trained model from
its checkpoint and hands it to `export_surgical_model`; `checkpoint_dir_of` and
`verify_base_model` check the command's source and the base model on disk first.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.io.checkpoints import load_pretrained, save_hf
from ultrametric_jax.io.export_format import (EXPORT_INFO_KEY, ROUTER_FILE, SELECTOR_FILE,
                                              SURGERY_CONFIG_KEY, router_shape_problem,
                                              selector_param_name, selector_shape_problem)
from ultrametric_jax.io.hf import hf_name, write_safetensors
from ultrametric_jax.io.safetensors_files import read_tensor, tensor_table
from ultrametric_jax.io.tokenizer import save_tokenizer, tokenizer_from_gguf
from ultrametric_jax.run.checkpoint import CHECKPOINT_SUBDIR
from ultrametric_jax.run.provenance import base_model_identity
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import inject_topology, surgical_layers, trainable_filter

EXPORT_FORMAT_VERSION = 1
SELECTION_INFO_KEY = "key_selection"        # a selector file's record of its fit
# Tokenizer-side files of an HF directory, copied verbatim when the base model is one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


class ExportError(ConfigError):
    """An export cannot proceed; the message names the missing or mismatching piece."""


# ----------------------------------------------------------------------------- router tensors

def router_tensors(router_params: nnx.State, config, surgery: SurgeryConfig) -> dict:
    """HF-named float32 numpy tensors (torch layout) of a router state, checked complete."""
    tensors = {}
    for path, var in nnx.to_flat_state(router_params):
        name, transpose = hf_name(path)
        value = var.get_value() if hasattr(var, "get_value") else var
        arr = np.asarray(value, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(arr.T if transpose and arr.ndim == 2 else arr)
    problem = router_shape_problem({n: t.shape for n, t in tensors.items()}, config, surgery)
    if problem:
        raise ExportError(problem)
    return tensors


def selector_tensors(model) -> dict:
    """{tensor name (selector_param_name): float32 numpy array} of every surgical layer's key
    selector (empty without selectors)."""
    out = {}
    for index, layer in enumerate(surgical_layers(model)):
        if layer.selector is None:
            continue
        for name in ("query_proj", "key_proj"):
            out[selector_param_name(index, name)] = np.asarray(
                getattr(layer.selector, name)[...], np.float32)
        out[selector_param_name(index, "log_threshold")] = np.asarray(
            layer.selector.log_threshold[...], np.float32).reshape(1)
    return out


def _selector_holders(model) -> list:
    """The surgical layers of `model`, each with a key selector (ExportError otherwise)."""
    layers = surgical_layers(model)
    if not layers or any(layer.selector is None for layer in layers):
        raise ExportError("the model has no key selectors (a surgery with key_rank > 0)")
    return layers


def save_selectors(model, path: str, info: Optional[dict] = None) -> str:
    """Writes every layer's key selector to the safetensors file `path`, atomically (a reader
    sees the old file or the new one), with the surgery config and `info` as metadata."""
    layers = _selector_holders(model)
    tensors = selector_tensors(model)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write_safetensors(tmp, [(n, a.shape, np.float32) for n, a in tensors.items()],
                          tensors.__getitem__, metadata={
                              SURGERY_CONFIG_KEY: json.dumps(layers[0].surgery_config.to_dict()),
                              SELECTION_INFO_KEY: json.dumps(info or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_selectors(model, path: str) -> None:
    """Sets every layer's key selector from a file save_selectors (or an export) wrote;
    ExportError naming the file when it is missing or does not fit the model."""
    layers = _selector_holders(model)
    if not os.path.isfile(path):
        raise ExportError(f"missing key selectors: {path} does not exist (the surgery has "
                          f"key_rank={layers[0].surgery_config.key_rank}; evaluating the run "
                          "fits and writes them)")
    problem = selector_shape_problem({n: shape for n, (shape, _) in tensor_table(path).items()},
                                     model.config, layers[0].surgery_config)
    if problem:
        raise ExportError(f"{path}: {problem}")
    for index, layer in enumerate(layers):
        for name in ("query_proj", "key_proj"):
            getattr(layer.selector, name)[...] = jnp.asarray(
                read_tensor(path, selector_param_name(index, name)), jnp.float32)
        layer.selector.log_threshold[...] = jnp.asarray(
            read_tensor(path, selector_param_name(index, "log_threshold"))[0], jnp.float32)


def selector_info(path: str) -> dict:
    """The `info` save_selectors recorded in `path` ({} when there is none)."""
    with safe_open(path, framework="np") as f:
        return json.loads((f.metadata() or {}).get(SELECTION_INFO_KEY, "{}"))


def selector_surgery(path: str) -> Optional[SurgeryConfig]:
    """The SurgeryConfig save_selectors recorded in `path` (None when there is none)."""
    with safe_open(path, framework="np") as f:
        recorded = (f.metadata() or {}).get(SURGERY_CONFIG_KEY)
    return None if recorded is None else SurgeryConfig.from_dict(json.loads(recorded))


# ----------------------------------------------------------------------------- writing

README = """# Ultrametric surgery export

The dense base model plus a learned ultrametric attention topology (one router per attention
layer, in `{router}`; its hyper-parameters are `{key}` in config.json; with key selectors,
their fitted score projections and thresholds in `{selectors}`).

- Surgical model (hard block-sparse attention, works with `generate()`):

      from ultrametric_jax.pytorch.surgical_llama import load_surgical_llama
      model = load_surgical_llama("{name}")

- `AutoModelForCausalLM.from_pretrained("{name}")` loads only the dense base model: the
  routers in `{router}` are not part of its weights and are ignored.
"""


def _write_tokenizer(out_dir: str, tokenizer, tokenizer_dir: Optional[str], config) -> list:
    written = []
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                written.append(name)
    if tokenizer is not None and "tokenizer.json" not in written:
        save_tokenizer(tokenizer, out_dir, config=config)
        written += ["tokenizer.json", "tokenizer_config.json"]
    return written


def _is_export(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            return EXPORT_INFO_KEY in json.load(f)
    except (OSError, ValueError):
        return False


def _check_output_dir(out_dir: str, overwrite: bool) -> None:
    """An output directory must be new or empty; overwrite replaces only an earlier export."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(f"output directory {out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise ExportError(f"output directory {out_dir} exists and is not empty; choose a new "
                          "directory or pass --overwrite")
    if not _is_export(out_dir):
        raise ExportError(f"output directory {out_dir} is not an earlier export; refusing to "
                          "replace it even with --overwrite")


def export_surgical_model(model, surgery: SurgeryConfig, out_dir: str, *,
                          router_params: Optional[nnx.State] = None, tokenizer=None,
                          tokenizer_dir: Optional[str] = None, provenance: Optional[dict] = None,
                          overwrite: bool = False) -> str:
    """Write `model`'s base weights, `surgery` and the routers to an HF directory.

    model: the JAX LlamaForCausalLM, with or without the topology injected.
    router_params: the RouterParam state to export (default: the model's own routers).
    tokenizer: a tokenizer object or path, and/or tokenizer_dir: an HF directory whose
    tokenizer files are copied verbatim. provenance: recorded under `ultrametric_export`.
    The directory is assembled next to out_dir and moved into place when complete.
    """
    if not isinstance(surgery, SurgeryConfig):
        raise TypeError(f"surgery must be a SurgeryConfig, got {type(surgery).__name__}")
    if router_params is None:
        router_params = nnx.state(model, trainable_filter())
    tensors = router_tensors(router_params, model.config, surgery)
    out_dir = os.path.abspath(out_dir)
    _check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        save_hf(model, tmp, config_extra={
            SURGERY_CONFIG_KEY: surgery.to_dict(),
            EXPORT_INFO_KEY: {"format_version": EXPORT_FORMAT_VERSION,
                              "router_file": ROUTER_FILE, **(provenance or {})}})
        write_safetensors(os.path.join(tmp, ROUTER_FILE),
                          [(n, t.shape, t.dtype) for n, t in tensors.items()], tensors.__getitem__,
                          metadata={SURGERY_CONFIG_KEY: json.dumps(surgery.to_dict())})
        if surgery.key_rank:
            selectors = selector_tensors(model)
            problem = selector_shape_problem({n: a.shape for n, a in selectors.items()},
                                             model.config, surgery)
            if problem:
                raise ExportError(f"the model's key selectors do not match the surgery: "
                                  f"{problem}")
            write_safetensors(os.path.join(tmp, SELECTOR_FILE),
                              [(n, a.shape, np.float32) for n, a in selectors.items()],
                              selectors.__getitem__)
        _write_tokenizer(tmp, tokenizer, tokenizer_dir, model.config)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(README.format(router=ROUTER_FILE, key=SURGERY_CONFIG_KEY,
                                  selectors=SELECTOR_FILE, name=os.path.basename(out_dir)))
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- reading

def surgery_export_config(directory: str) -> Optional[SurgeryConfig]:
    """The SurgeryConfig of an export directory; None for a directory that is no export (no
    surgery section in its config.json and no router file). ExportError for half an export."""
    if not os.path.isdir(directory):
        return None
    section = None
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        section = config.get(SURGERY_CONFIG_KEY) if isinstance(config, dict) else None
    except (OSError, ValueError):
        pass  # the model loader reports a missing or bad config.json
    has_router = os.path.exists(os.path.join(directory, ROUTER_FILE))
    if section is None and not has_router:
        return None
    if section is None:
        raise ExportError(f"{directory} holds {ROUTER_FILE} but its config.json has no "
                          f"{SURGERY_CONFIG_KEY!r} section: the routers' topology is unknown")
    if not has_router:
        raise ExportError(f"{directory} is a surgery export without its routers: "
                          f"{os.path.join(directory, ROUTER_FILE)} does not exist")
    return SurgeryConfig.from_dict(section)


def load_surgical_export(directory: str, dtype="float32"):
    """(JAX model with the exported topology, evaluation mode; its SurgeryConfig) of an export
    directory: the base weights, then the routers of ROUTER_FILE (and the key selectors of
    SELECTOR_FILE), checked complete."""
    surgery = surgery_export_config(directory)
    if surgery is None:
        raise ExportError(f"{directory} is not a surgery export: its config.json has no "
                          f"{SURGERY_CONFIG_KEY!r} section and it holds no {ROUTER_FILE}")
    router_path = os.path.join(directory, ROUTER_FILE)
    model = load_pretrained(directory, dtype=dtype)
    problem = router_shape_problem({name: shape for name, (shape, _) in
                                    tensor_table(router_path).items()}, model.config, surgery)
    if problem:
        raise ExportError(f"{router_path}: {problem}")
    inject_topology(model, surgery, nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, trainable_filter())):
        name, transpose = hf_name(path)
        value = read_tensor(router_path, name)
        var.set_value(jnp.asarray(value.T if transpose and value.ndim == 2 else value,
                                  jnp.float32))
    if surgery.key_rank:
        load_selectors(model, os.path.join(directory, SELECTOR_FILE))
    model.eval()
    return model, surgery


# ----------------------------------------------------------------------------- run checkpoints

def checkpoint_dir_of(workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                      step: Optional[int] = None) -> tuple[str, Optional[int]]:
    """(Orbax checkpoint directory, step or None) from --workdir or --checkpoint [--step].

    --checkpoint may name the run's checkpoints directory or one step inside it.
    """
    if (workdir is None) == (checkpoint is None):
        raise ExportError("give exactly one of --workdir DIR or --checkpoint PATH")
    if workdir is not None:
        if not os.path.isdir(workdir):
            raise ExportError(f"--workdir {workdir} does not exist or is not a directory")
        directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
        if not os.path.isdir(directory):
            raise ExportError(f"--workdir {workdir} is not a surgery run directory: it has no "
                              f"{CHECKPOINT_SUBDIR}/ (train one with `ultrametric train "
                              f"--workdir {workdir}`)")
        return os.path.abspath(directory), step
    if not os.path.isdir(checkpoint):
        raise ExportError(f"--checkpoint {checkpoint} does not exist or is not a directory")
    name = os.path.basename(os.path.normpath(checkpoint))
    if name.isdigit() and os.path.isfile(os.path.join(checkpoint, "_CHECKPOINT_METADATA")):
        if step is not None and step != int(name):
            raise ExportError(f"--checkpoint {checkpoint} is step {name} but --step {step} "
                              "was given")
        return os.path.abspath(os.path.dirname(os.path.normpath(checkpoint))), int(name)
    return os.path.abspath(checkpoint), step


def verify_base_model(recorded: dict) -> str:
    """The recorded base model's path, after checking its files still hash as recorded."""
    path = recorded.get("path")
    if not path or not os.path.exists(path):
        raise ExportError(f"the base model the run trained on, {path!r}, no longer exists")
    current = base_model_identity(path)["files"]
    saved = recorded.get("files") or {}
    changed = sorted(n for n in set(saved) | set(current) if saved.get(n) != current.get(n))
    if changed:
        details = "; ".join(f"{n}: recorded sha256 {str(saved.get(n))[:12]}, now "
                            f"{str(current.get(n))[:12]}" for n in changed[:3])
        raise ExportError(f"the base model at {path} no longer matches the checkpoint's "
                          f"recorded hash ({details}); refusing to export routers onto "
                          "different base weights")
    return path


def tokenizer_source(base_path: str) -> tuple[object, Optional[str]]:
    """(tokenizer or None, HF dir to copy tokenizer files from or None) for a base model."""
    if os.path.isdir(base_path):
        return None, base_path
    sibling = os.path.join(os.path.dirname(base_path), "tokenizer.json")
    if os.path.isfile(sibling):        # e.g. the cached SmolLM2 (model.gguf + tokenizer.json)
        return sibling, None
    if base_path.endswith(".gguf"):
        return tokenizer_from_gguf(base_path), None
    return None, None
