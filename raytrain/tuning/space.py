"""Search spaces as YAML, validated against the config schema before any trial runs.

A space file (tune/spaces/*.yaml, format in tune/spaces/README.md; a shipped one by bare name: `paper`)::

    space:                                   # sampled parameters, keyed by dotted config key
      loss.lambda_cam: {dist: loguniform, low: 0.1, high: 10}
      loss.cam_weights.2: {dist: loguniform, low: 1.0e-5, high: 1.0e-3}   # one list element
      rois.scales: {dist: choice, values: [[1.5, 1.25, 0.8, 0.65], [1.3, 1.15, 0.9, 0.8]]}
      rois.num_rois: {dist: int, low: 1, high: 5}                          # inclusive bounds
      model.fusion: {dist: grid, values: [raf, self_attention]}
    variants:                                # optional: a grid over named override sets
      full: {}
      no_raf: {model.fusion: none}
    fixed: {optim.max_steps: 200}            # optional: overrides applied to every trial
    tune: {scheduler: fifo}                  # optional: TuneSettings fields (driver.py)

`load_space(path, base_cfg)` checks every entry by applying its extreme values (low, high,
each choice) to the base config and running the config's own coercion and validation, so a
typo, a value outside a field's bounds or a wrong type raises `ConfigError` naming the entry
and the file. `SearchSpace.apply(cfg_dict, params)` builds a trial's config dict.
"""
import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import (
    ConfigError,
    ExperimentConfig,
    config_from_raw,
    from_dict,
    named_file,
    read_yaml,
    set_dotted,
    to_dict,
    validate,
)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "int", "grid")
VARIANT_KEY = "variant"          # the Tune parameter name of the `variants` grid
TOP_LEVEL = ("space", "variants", "fixed", "tune", "description")


@dataclass
class Param:
    key: str                     # dotted config key, list elements as `key.N`
    dist: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @property
    def is_grid(self) -> bool:
        return self.dist == "grid"

    def extremes(self) -> list[Any]:
        if self.dist in ("choice", "grid"):
            return list(self.values)
        if self.dist == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def tune_domain(self):
        from ray import tune
        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "int":
            return tune.randint(int(self.low), int(self.high) + 1)   # Tune's upper bound is exclusive
        if self.dist == "choice":
            return tune.choice(_encode_choices(self.values))
        return tune.grid_search(_encode_choices(self.values))

    def describe(self) -> str:
        if self.dist in ("choice", "grid"):
            return f"{self.dist} {self.values}"
        return f"{self.dist} [{self.low}, {self.high}]"


@dataclass
class SearchSpace:
    path: str
    params: list[Param] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def has_grid(self) -> bool:
        return bool(self.variants) or any(p.is_grid for p in self.params)

    @property
    def grid_size(self) -> int:
        n = len(self.variants) if self.variants else 1
        for p in self.params:
            if p.is_grid:
                n *= len(p.values)
        return n

    def param_names(self) -> list[str]:
        names = [p.key for p in self.params]
        return ([VARIANT_KEY] if self.variants else []) + names

    def tune_param_space(self) -> dict[str, Any]:
        """Flat {dotted key: Tune domain}; Tune/Optuna never see nested config."""
        from ray import tune
        out = {p.key: p.tune_domain() for p in self.params}
        if self.variants:
            out[VARIANT_KEY] = tune.grid_search(list(self.variants))
        return out

    def apply(self, cfg_dict: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The trial's config dict: base, then `fixed`, then the variant, then sampled params."""
        raw = copy.deepcopy(cfg_dict)
        for key, value in self.fixed.items():
            set_value(raw, key, value)
        variant = params.get(VARIANT_KEY)
        if variant is not None:
            for key, value in self.variants[variant].items():
                set_value(raw, key, value)
        for p in self.params:
            if p.key in params:
                set_value(raw, p.key, _decode_choice(params[p.key]))
        return raw

    def trial_config(self, cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
        out = from_dict(ExperimentConfig, self.apply(to_dict(cfg), params), prefix="")
        validate(out)
        return out


# ----------------------------------------------------------------------------- loading

def load_space(path: str, base_cfg: ExperimentConfig | None = None) -> SearchSpace:
    """Read and validate a space file (a path, or the bare name of a shipped space) against `base_cfg`
    (defaults: ExperimentConfig())."""
    path = named_file(str(path), "spaces")
    raw = read_yaml(path)
    where = f"{path}"
    unknown = [k for k in raw if k not in TOP_LEVEL]
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; expected {list(TOP_LEVEL)}")
    space = SearchSpace(path=str(path), description=str(raw.get("description", "")))
    entries = raw.get("space") or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"{where}: 'space' must be a mapping of dotted config keys to distributions")
    for key, spec in entries.items():
        space.params.append(_parse_param(str(key), spec, where))
    space.fixed = _mapping(raw.get("fixed"), f"{where}: 'fixed'")
    space.tune = _mapping(raw.get("tune"), f"{where}: 'tune'")
    variants = _mapping(raw.get("variants"), f"{where}: 'variants'")
    for name, overrides in variants.items():
        space.variants[str(name)] = _mapping(overrides, f"{where}: variant {name!r}")
    if not space.params and not space.variants:
        raise ConfigError(f"{where}: empty search space (no 'space' entries and no 'variants')")
    check_space(space, base_cfg if base_cfg is not None else ExperimentConfig())
    return space


def check_space(space: SearchSpace, base_cfg: ExperimentConfig):
    """Apply every extreme value of every entry to the base config and validate."""
    where = space.path
    base = to_dict(base_cfg)
    fixed_base = copy.deepcopy(base)
    for key, value in space.fixed.items():
        _check_one(base, {key: value}, f"{where}: fixed entry {key!r}")
        set_value(fixed_base, key, value)
    for name, overrides in space.variants.items():
        _check_one(fixed_base, overrides, f"{where}: variant {name!r}")
    for p in space.params:
        _check_type(p, where)
        for value in p.extremes():
            _check_one(fixed_base, {p.key: value}, f"{where}: entry {p.key!r} ({p.describe()}) at value {value!r}")


def _check_one(base: dict[str, Any], overrides: dict[str, Any], label: str):
    raw = copy.deepcopy(base)
    try:
        for key, value in overrides.items():
            set_value(raw, key, value)
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    config_from_raw(raw, label)


def _check_type(p: Param, where: str):
    """Continuous distributions need a float field; `int` an int (or float) field."""
    tp = field_type(p.key, where)
    label = f"{where}: entry {p.key!r}"
    if p.dist in ("loguniform", "uniform") and tp is not float:
        raise ConfigError(f"{label}: {p.dist} draws floats but the field is {_type_name(tp)}")
    if p.dist == "int" and tp not in (int, float):
        raise ConfigError(f"{label}: int draws integers but the field is {_type_name(tp)}")


def field_type(key: str, where: str = ""):
    """The annotated type of a dotted key (`a.b` or list element `a.b.N`); ConfigError if unknown."""
    parts = key.split(".")
    tp = ExperimentConfig
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                prefix = ".".join(parts[:i])
                known = ", ".join(f.name for f in dataclasses.fields(tp))
                raise ConfigError(f"{where}: entry {key!r}: unknown key {part!r}"
                                  f"{' in ' + prefix if prefix else ''}; known: {known}")
            tp = hints[part]
            continue
        origin = typing.get_origin(tp)
        if origin in (list, list) and part.isdigit():
            tp = typing.get_args(tp)[0]
            continue
        raise ConfigError(f"{where}: entry {key!r}: {'.'.join(parts[:i])} is a value, not a section or list")
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def set_value(tree: dict[str, Any], key: str, value: Any):
    """set_dotted, plus `list_field.N` for one element of a list field."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        parent = tree
        for part in parts[:-2]:
            parent = parent.setdefault(part, {})
        current = parent.get(parts[-2])
        if not isinstance(current, list):
            raise ConfigError(f"{'.'.join(parts[:-1])}: not a list, cannot set element {parts[-1]}")
        index = int(parts[-1])
        if index >= len(current):
            raise ConfigError(f"{key}: index {index} out of range (the list has {len(current)} elements)")
        current = list(current)
        current[index] = value
        parent[parts[-2]] = current
        return
    set_dotted(tree, key, value)


def _parse_param(key: str, spec: Any, where: str) -> Param:
    label = f"{where}: entry {key!r}"
    if isinstance(spec, list):                      # shorthand: a bare list is a choice
        spec = {"dist": "choice", "values": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{label}: expected a mapping like {{dist: uniform, low: 0, high: 1}}, got {spec!r}")
    allowed = {"dist", "low", "high", "values"}
    extra = [k for k in spec if k not in allowed]
    if extra:
        raise ConfigError(f"{label}: unknown field(s) {extra}; allowed: {sorted(allowed)}")
    dist = spec.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{label}: dist {dist!r} is not one of {list(DISTRIBUTIONS)}")
    if dist in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{label}: {dist} needs a non-empty list 'values'")
        if "low" in spec or "high" in spec:
            raise ConfigError(f"{label}: {dist} takes 'values', not low/high")
        return Param(key, dist, values=values)
    if "values" in spec:
        raise ConfigError(f"{label}: {dist} takes low/high, not 'values'")
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{label}: '{name}' must be a finite number, got {v!r}")
    if dist == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{label}: int bounds must be integers, got {low}, {high}")
    if (low > high) if dist == "int" else (low >= high):
        raise ConfigError(f"{label}: low ({low}) must be below high ({high})")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{label}: loguniform needs low > 0, got {low}")
    return Param(key, dist, low=low, high=high)


def _mapping(value, label) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{label} must be a mapping, got {value!r}")
    return dict(value)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# Tune/Optuna categorical values must be hashable scalars; lists travel as tagged strings.
_LIST_TAG = "list:"


def _encode_choices(values: list[Any]) -> list[Any]:
    import json
    return [_LIST_TAG + json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]


def _decode_choice(value: Any) -> Any:
    import json
    if isinstance(value, str) and value.startswith(_LIST_TAG):
        return json.loads(value[len(_LIST_TAG):])
    return value


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: _decode_choice(v) for k, v in params.items()}
