"""A model's files as the driver sees them, without torch or transformers: where they are (``reference:NAME``,
a local folder or a hub name), their fingerprint, the dtype they are stored in, and the family and units their
``config.json`` gives.

A search's driver only checks the model and names its units; the actors load it. Importing transformers (which
imports torch) costs a driver on 2 CPU cores about 2.5 s before Ray can start, so a local ``config.json`` that
names everything the units need is read as JSON; anything else (a hub name, ``trust_remote_code``, a config
missing a field its class would fill in) goes through ``transformers.AutoConfig`` as before.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

from .units import expert_unit, moe_module_path

REFERENCE_MODELS = ("dense", "moe", "llama")
FAMILY_NAMES = ("encdec", "decoder", "moe")
STORED_DTYPES = ("float32", "float16", "bfloat16")

# the config.json fields each family's units are read from
_UNIT_FIELDS = {"encdec": ("encoder_layers", "decoder_layers"),
                "decoder": ("num_hidden_layers",),
                "moe": ("encoder_layers", "decoder_layers", "encoder_sparse_step", "decoder_sparse_step", "num_experts")}


class FamilyError(ValueError):
    """A model or prune set a family cannot handle; one line naming the bad value."""


def resolve_model_path(name: str) -> str:
    """``reference:NAME`` -> the shipped model's directory; anything else is passed to HF as is."""
    if name.startswith("reference:"):
        which = name.split(":", 1)[1]
        path = Path(str(resources.files("cullmt_ray") / "reference" / "models" / which))
        if which not in REFERENCE_MODELS or not (path / "config.json").exists():
            shipped = [m for m in REFERENCE_MODELS if (path.parent / m / "config.json").exists()]
            raise FamilyError(f"model {name!r} is not shipped; available: "
                              f"{', '.join('reference:' + m for m in shipped) or 'none'}")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FamilyError(f"model {name!r}: no such model folder (expected a directory with config.json, "
                              "a hub name like facebook/nllb-200-distilled-600M, or reference:dense)")
        return str(path)
    return name


def model_fingerprint(name: str) -> str:
    """Identity of the weights behind ``name``: for a local folder, a hash of its config and the
    size and first MiB of each weight file (so retraining in place never reuses stale scores);
    for a hub name, the name itself (plus the revision a user pins in it)."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return name
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
    return f"{name}#{h.hexdigest()[:12]}"


def stored_dtype(model_name: str) -> str:
    """The dtype the base model's weights are stored in (its config's ``dtype``), float32 if unknown."""
    path = Path(resolve_model_path(model_name))
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return d if d in STORED_DTYPES else "float32"


def _family_of(conf) -> str:
    if "moe" in (getattr(conf, "model_type", None) or ""):
        return "moe"
    return "encdec" if getattr(conf, "is_encoder_decoder", False) else "decoder"


def _known_model_type(model_type: str) -> bool:
    """Whether the installed transformers has a model package for ``model_type`` (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return False
    return (Path(list(spec.submodule_search_locations)[0]) / "models" / model_type.replace("-", "_")).is_dir()


def _from_json(path: str, family: str) -> SimpleNamespace | None:
    """``config.json`` of a local folder as attributes, where it holds every field the units need (else None)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str) or "auto_map" in raw \
            or not _known_model_type(raw["model_type"]):
        return None  # transformers decides (and names what is wrong)
    conf = SimpleNamespace(**raw)  # (an encoder-decoder without is_encoder_decoder reads as decoder-only, and
    # lacks num_hidden_layers: transformers decides)
    fam = family if family != "auto" else _family_of(conf)
    return conf if all(f in raw for f in _UNIT_FIELDS.get(fam, ("?",))) else None


def read_config(name: str, trust_remote_code: bool = False, family: str = "auto"):
    """The model's config: its local ``config.json`` as attributes where that suffices for ``family``'s units
    (see the module doc), else ``transformers.AutoConfig``'s. A model neither gives: one-line :class:`FamilyError`."""
    path = resolve_model_path(name)
    if Path(path).is_dir() and not trust_remote_code and (conf := _from_json(path, family)) is not None:
        return conf
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FamilyError(f"model.name={name!r}: not a local model folder, and the hub could not "
                          f"provide it ({str(e).splitlines()[0][:120]})") from None


def config_units(family: str, conf) -> list[str]:
    """The units of a model of ``family`` with config ``conf`` (no weights): its layers (``enc.I``/``dec.I``,
    ``layer.I``) or, for NLLB-MoE, the experts of its sparse layers (every ``*_sparse_step``-th) less
    ``cullmt_missing_experts`` (those a pruned export no longer holds)."""
    if family == "encdec":
        return [f"{p}.{i}" for p, n in (("enc", conf.encoder_layers), ("dec", conf.decoder_layers)) for i in range(n)]
    if family == "decoder":
        return [f"layer.{i}" for i in range(conf.num_hidden_layers)]
    missing = getattr(conf, "cullmt_missing_experts", None) or {}
    out = []
    for side, n, step in (("enc", conf.encoder_layers, conf.encoder_sparse_step),
                          ("dec", conf.decoder_layers, conf.decoder_sparse_step)):
        for i in range(n):
            if step and (i + 1) % step == 0:
                gone = set(missing.get(moe_module_path(f"{side}.{i}"), []))
                out += [expert_unit(f"{side}.{i}", e) for e in range(conf.num_experts) if e not in gone]
    return out


def model_units(name: str, family: str = "auto", trust_remote_code: bool = False) -> tuple[str, list[str]]:
    """(family name, units) of a model, from its config only: what the driver needs before any actor loads it."""
    if family not in ("auto", *FAMILY_NAMES):
        raise FamilyError(f"model.family={family!r}: expected auto or one of {', '.join(FAMILY_NAMES)}")
    conf = read_config(name, trust_remote_code, family)
    fam = family if family != "auto" else _family_of(conf)
    return fam, config_units(fam, conf)
