"""Reading official DrasCLR checkpoints and our bundle weights, safely (``weights_only=True``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from drasclr_ext.bundle_files import large_file_hash, record_large_file
from drasclr_ext.errors import CheckpointError
from drasclr_ext.fileio import atomic_write, sha256sum
from drasclr_ext.networks.encoder import DrasCLREncoder

__all__ = [
    "compact_state",
    "compact_weights_file",
    "convert_official_checkpoint",
    "encoder_config",
    "encoder_from_state",
    "load_bundle_weights",
    "load_encoder",
    "load_pretrained_encoder",
    "load_official_encoder",
    "safe_torch_load",
    "save_atomic",
    "sha256sum",
    "unwrap",
]

OFFICIAL_ROUTING = "._routing_fn.fc."
OUR_ROUTING = ".routing."
REQUIRED_ENCODER_KEYS = ("conv1.weight", "conv1._routing_fn.fc.weight", "conv4.weight", "bn4.running_var")


def unwrap(module: Any) -> Any:
    """The module inside DistributedDataParallel/DataParallel, else the object itself."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, wrappers) else module


def safe_torch_load(path: str | os.PathLike, expected_sha256: str | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` on CPU, with an optional hash check and our errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give the path of a .pt/.pth/.pth.tar file")
    if expected_sha256 is not None:
        actual = sha256sum(path)
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"checkpoint {path} has sha256 {actual}, expected {expected_sha256}: the file is corrupt or not the "
                "published one; download it again"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, forbidden globals
        raise CheckpointError(
            f"could not read checkpoint {path} with weights_only=True ({_load_failure(exc)}). It is truncated, not a "
            "PyTorch checkpoint, or holds Python objects other than tensors, which are never unpickled: they could "
            "run arbitrary code. Give a state dict saved with torch.save, or convert the file where it came from"
        ) from None  # torch's own message advises weights_only=False, the unsafe step: not shown


def _load_failure(exc: BaseException) -> str:
    """The specific reason of a ``torch.load(weights_only=True)`` failure, without torch's advice to unpickle."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    first = (text.strip().splitlines() or [""])[0].split(" Please ")[0].split(" Re-running ")[0].strip()
    return type(exc).__name__ if not first or "weights_only" in first else f"{type(exc).__name__}: {first}"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see half a file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def official_encoder_state(checkpoint: Mapping[str, Any], encoder: str = "encoder_q") -> dict[str, torch.Tensor]:
    """The state dict of one encoder of an official checkpoint, in the official key names (prefix removed)."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(
            f"not an official DrasCLR checkpoint: no 'state_dict' entry (found {found}). Expected the dict that "
            "DrasCLR's training saves: epoch, arch, optimizer and state_dict with module.encoder_q.* keys"
        )
    state = checkpoint["state_dict"]
    for prefix in (f"module.{encoder}.", f"{encoder}."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            break
    else:
        raise CheckpointError(
            f"the checkpoint's state_dict has no 'module.{encoder}.*' keys: it is not a DrasCLR training checkpoint"
        )
    missing = [k for k in REQUIRED_ENCODER_KEYS if k not in sub]
    if missing:
        raise CheckpointError(f"the checkpoint's {encoder} lacks {missing}: it is not a DrasCLR encoder")
    return sub


def official_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official encoder keys (``conv1._routing_fn.fc.weight``) to ours (``conv1.routing.weight``)."""
    return {k.replace(OFFICIAL_ROUTING, OUR_ROUTING): v for k, v in state.items()}


def ours_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_ours`."""
    return {k.replace(OUR_ROUTING, OFFICIAL_ROUTING): v for k, v in state.items()}


def encoder_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``DrasCLREncoder`` arguments inferred from the tensor shapes of an encoder state dict (our key names)."""
    try:
        conv1, routing, conv4 = state["conv1.weight"], state["conv1.routing.weight"], state["conv4.weight"]
    except KeyError as exc:
        raise CheckpointError(f"encoder state dict lacks {exc.args[0]!r}: it is not a DrasCLR encoder") from exc
    if "fc.0.weight" in state and "fc.2.weight" in state:
        mlp, moco_dim = True, state["fc.2.weight"].shape[0]
    elif "fc.weight" in state:
        mlp, moco_dim = False, state["fc.weight"].shape[0]
    else:
        raise CheckpointError(
            "encoder state dict has no projection head (fc.0/fc.2 or fc): it is not a DrasCLR encoder"
        )
    return {
        "rep_dim": int(conv4.shape[1]),
        "moco_dim": int(moco_dim),
        "num_experts": int(conv1.shape[0]),
        "num_coordinates": int(routing.shape[1]) // 3,
        "mlp": mlp,
        "in_channels": int(conv1.shape[2]),
    }


def encoder_from_state(state: Mapping[str, torch.Tensor]) -> DrasCLREncoder:
    """A ``DrasCLREncoder`` in eval mode built and loaded from a state dict (our key names)."""
    encoder = DrasCLREncoder(**encoder_config(state))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit a DrasCLR encoder: {exc}") from exc
    return encoder.eval()


def load_official_encoder(path: str | os.PathLike, expected_sha256: str | None = None) -> DrasCLREncoder:
    """The query encoder of an official DrasCLR checkpoint, with its shape inferred, in eval mode."""
    checkpoint = safe_torch_load(path, expected_sha256)
    return encoder_from_state(official_to_ours(official_encoder_state(checkpoint)))


def encoder_state(obj: Any, path: str | os.PathLike = "") -> dict[str, torch.Tensor]:
    """Encoder state dict (our key names) from a loaded bundle ``model.pt`` or official training checkpoint."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return official_to_ours(official_encoder_state(obj))
    if isinstance(obj, Mapping):
        return strip_prefix(obj)
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of a DrasCLR encoder")


def load_encoder(path: str | os.PathLike, expected_sha256: str | None = None) -> DrasCLREncoder:
    """An encoder from a bundle ``model.pt`` (a plain encoder state dict) or an official training checkpoint."""
    return encoder_from_state(encoder_state(safe_torch_load(path, expected_sha256), path))


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``encoder.`` / ``encoder_q.`` prefixes that wrappers add to encoder keys."""
    out = dict(state)
    for prefix in ("module.", "encoder_q.", "encoder."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def convert_official_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the query encoder of an official checkpoint as a bundle-ready ``model.pt`` (plain CPU state dict)."""
    encoder = load_official_encoder(src)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    return save_atomic(state, dst)


def load_bundle_weights(
    network: torch.nn.Module, path: str | os.PathLike, bundle_root: str | os.PathLike | None = None
) -> torch.nn.Module:
    """Load encoder weights into ``network`` (strict), checking the sha256 listed in the bundle's large_files.yml.

    ``path`` may be a bundle ``model.pt`` (plain encoder state dict) or an official DrasCLR checkpoint.
    """
    return _load_checked(network, path, bundle_root, "the bundle's network_def")


def _load_checked(
    module: torch.nn.Module, path: str | os.PathLike, bundle_root: str | os.PathLike | None, target: str
) -> torch.nn.Module:
    """Strict load of the state in ``path`` (its sha256 checked when ``bundle_root`` lists it) into ``module``."""
    expected = large_file_hash(bundle_root, path) if bundle_root is not None else None
    state = encoder_state(safe_torch_load(path, expected), path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {path} do not fit {target} ({exc}); "
            "set rep_dim/moco_dim/num_experts to those of the checkpoint"
        ) from exc
    return module


def load_pretrained_encoder(
    network: torch.nn.Module, path: str | os.PathLike, bundle_root: str | os.PathLike | None = None
) -> torch.nn.Module:
    """Load pretrained encoder weights (a bundle ``model.pt`` or an official checkpoint) into ``network.encoder``,
    checking the sha256 listed in the bundle's large_files.yml; the rest of ``network`` keeps its initialisation."""
    encoder = getattr(unwrap(network), "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise CheckpointError(
            f"{type(network).__name__} has no `encoder` to load the pretrained weights of {path} into"
        )
    _load_checked(encoder, path, bundle_root, "the network's encoder")
    return network


def compact_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with float32/float64 tensors stored as float16 (half the file; loading casts them back into the
    network's float32 parameters). Other dtypes (BatchNorm counters) are kept.

    Raises:
        CheckpointError: a value is not finite or does not fit float16 (|x| > 65504).
    """
    out = {}
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float16:
            if not bool(torch.isfinite(value).all()) or float(value.abs().max()) > torch.finfo(torch.float16).max:
                raise CheckpointError(f"{key} has values that float16 cannot hold; keep this checkpoint in float32")
            value = value.to(torch.float16)
        out[key] = value.detach().cpu().contiguous()
    return out


def compact_weights_file(path: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> str:
    """Rewrite the weights file ``path`` with :func:`compact_state` (atomically) and return its new sha256; with
    ``bundle_root`` the bundle's ``large_files.yml`` records it."""
    state = safe_torch_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; nothing to compact")
    save_atomic(compact_state(state), path)
    return record_large_file(bundle_root, path) if bundle_root is not None else sha256sum(path)
