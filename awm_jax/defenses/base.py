"""One interface for every defense: ``purify(model, variables, clean, key, config) -> result``.

A defense registers a :class:`Defense`: its name, its frozen config class (whose defaults are the
reference settings), and a ``purify`` driver that jits the defense's pure steps and runs them.
AWM is the first member; the baselines (FT, FP, NAD, NC, ANP, I-BAU) join under the same names
that ``awm-jax purify --defense NAME`` accepts.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn

from awm_jax.data.dataset import Split
from awm_jax.registry import Registry
from awm_jax.types import PRNGKey, Variables

EpochCallback = Callable[[int, Variables], dict[str, float]]


def config_preset(cls: type, presets: dict[str, dict[str, Any]], name: str, what: str,
                  overrides: dict[str, Any]):
    """``cls(**presets[name], **overrides)``: a config class's named setting.

    Raises:
      ValueError: ``name`` is not in ``presets``; the message names ``what`` and lists them.
    """
    if name not in presets:
        raise ValueError(f"unknown {what} preset {name!r}; known: {', '.join(presets)}.")
    return cls(**{**presets[name], **overrides})


@dataclasses.dataclass
class DefenseResult:
    """What every defense returns.

    Attributes:
      variables: the purified model's ``{"params", "batch_stats"}``.
      history: one dict per epoch (the defense's own metrics plus the callback's).
      seconds: wall time of the defense itself (evaluation callbacks excluded).
      details: defense-specific facts for the report (e.g. mask statistics, selected epoch).
    """

    variables: Variables
    history: list[dict[str, float]]
    seconds: float
    details: dict[str, Any]


class Defense(NamedTuple):
    """A registered defense.

    Attributes:
      name: registry name.
      config_class: frozen dataclass of its settings (with ``to_dict``/``from_dict``).
      purify: ``(model, variables, clean, key, config, *, num_classes, on_epoch, progress,
        workdir, checkpoint_every, max_to_keep, resume) -> DefenseResult``. With ``workdir``
        the run's whole state is checkpointed there with orbax every ``checkpoint_every`` of
        the defense's steps (:mod:`awm_jax.defenses.checkpointing` lists each defense's step);
        ``resume=True`` continues from the newest checkpoint, bit-identically.
    """

    name: str
    config_class: type
    purify: Callable[..., DefenseResult]


DEFENSES: Registry = Registry("defense")


def get_defense(name: str) -> Defense:
    """The registered defense ``name`` (an unknown name raises a ValueError listing the known)."""
    return DEFENSES.get(name)()


def purify(name: str, model: nn.Module, variables: Variables, clean: Split, key: PRNGKey,
           config=None, **kwargs) -> DefenseResult:
    """Runs defense ``name`` with ``config`` (its defaults when None)."""
    defense = get_defense(name)
    return defense.purify(model, variables, clean, key,
                          config if config is not None else defense.config_class(), **kwargs)


_BUILT: collections.OrderedDict = collections.OrderedDict()
_BUILT_MAX = 32


def build_once(builder: Callable[..., Any], *args, key: Any = None) -> Any:
    """``builder(*args)`` (e.g. a defense's jitted steps), reused for equal ``args`` (or
    ``key``) so that a second run in the process (a resume, a repeat) does not compile again.

    Args that cannot be hashed build uncached. The newest ``32`` builds are kept.
    """
    cache_key = (builder, args if key is None else key)
    try:
        if cache_key in _BUILT:
            _BUILT.move_to_end(cache_key)
            return _BUILT[cache_key]
    except TypeError:  # an unhashable argument (e.g. a module with a dict attribute)
        return builder(*args)
    built = _BUILT[cache_key] = builder(*args)
    while len(_BUILT) > _BUILT_MAX:
        _BUILT.popitem(last=False)
    return built
