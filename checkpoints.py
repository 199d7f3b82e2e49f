"""Checkpoints: safetensors (never pickle) with JSON metadata that names the method and the model they were made for,
written atomically (a temp file, fsync, then a rename: a crash leaves the last good checkpoint in place)."""
import json
import os
from pathlib import Path

from errors import KVNestError


def made_for(recorded, model) -> bool:
    """Whether a checkpoint's recorded model fingerprint is this model's. One written before fingerprints held a
    digest of the weights is compared on what it holds."""
    now = model.fingerprint()
    return isinstance(recorded, dict) and recorded == {k: v for k, v in now.items() if k in recorded or k != "digest"}


def save_checkpoint(path, tensors: dict, meta: dict) -> None:
    """Write tensors to safetensors with JSON metadata atomically."""
    from safetensors.torch import save_file
    tmp = Path(f"{path}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={"kvnest": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load_checkpoint(path, model, kind: str, made_by: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a `kind` checkpoint made for this model; anything else is refused by name."""
    from safetensors import SafetensorError, safe_open
    if not Path(path).is_file():
        raise KVNestError(f"{kind} checkpoint {path} does not exist; make one with `{made_by}`")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvnest", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise KVNestError(f"cannot read {path} ({str(e).splitlines()[0]}); it is damaged, train again") from None
    if meta.get("kvnest") != kind:
        raise KVNestError(f"{path} is not a {kind} checkpoint; pass one written by `{made_by}`")
    if not made_for(meta.get("model"), model):
        raise KVNestError(f"{path} was made for another model ({meta.get('model')}); train for this model or "
                          f"pass the model it was made for")
    return tensors, meta


def load_into(module, tensors: dict, path) -> None:
    """Move a module's tensors out of a checkpoint's `tensors` into it; a missing tensor or a wrong shape (an edited
    or damaged file) is refused by name before anything is loaded."""
    state = module.state_dict()
    for name, want in state.items():
        got = tensors.get(name)
        if got is None or got.shape != want.shape:
            found = "missing" if got is None else f"of shape {tuple(got.shape)}"
            raise KVNestError(f"{path}: tensor {name} is {found}, this model needs {tuple(want.shape)}; the "
                              f"checkpoint is damaged, train again")
    module.load_state_dict({k: tensors.pop(k) for k in state})
