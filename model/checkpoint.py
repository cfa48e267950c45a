"""Model files that load without the run that made them: a state dict plus the config beside it.

<folder>/model.pt            state dict only (loaded with weights_only=True: no pickled code runs)
<folder>/model_config.json   GPTConfig as JSON
"""

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from model.gpt import GPT, GPTConfig
from storage.errors import DiskFullError

WEIGHTS = "model.pt"
CONFIG = "model_config.json"


# A write that fails for want of space (a full disk, a spent quota) is a DiskFullError: a retry cannot help.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash or a full disk leaves the old file or the
    new one, never part of one. A full disk raises DiskFullError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save's zip writer reports a failed write as a RuntimeError ("unexpected pos ...") raised
        # while handling the OSError that says why.
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            raise DiskFullError(f"{path}: not written, no space left on its device ({cause.strerror})") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # torch.compile wraps the module and prefixes keys with "_orig_mod."; store plain keys.
    return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(folder: Path, model: GPT) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(_clean_state_dict(model), folder / WEIGHTS)
    config = getattr(model, "_orig_mod", model).config
    (folder / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_config(folder: Path) -> GPTConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model config beside the weights")
    return GPTConfig(**json.loads(path.read_text(encoding="utf-8")))


def load_model(folder: Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT from `model_config.json` and load `model.pt` into it (weights only)."""
    folder = Path(folder)
    model = GPT(load_config(folder))
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
