"""What a policy's per-module overrides hit in a built model, and the checks on them.

`bf16jax.models.build_model` records every module path the layers resolve
(`precision.record_paths`); from those paths this module reports which modules each override
rule decides (`describe_rule_hits`: the start-up log line), warns about a rule that decides none
(`check_rules`: a typo or a module the model lacks would otherwise change nothing, silently),
and refuses overrides that would differ between layers which `scan_layers=True` builds once and
stacks under one policy (`check_stacked_layers`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from bf16jax.precision import Policy, deciding_rule, note_paths

__all__ = ["rule_hits", "describe_rule_hits", "check_rules", "check_stacked_layers"]


def rule_hits(policy: Policy, paths: Iterable[str]) -> list[tuple[str, list[str]]]:
    """For each override of `policy`, in order: (its regex, the paths it decides).

    A rule decides a path when it is the first rule matching the path or one of its ancestors.
    """
    hits: list[list[str]] = [[] for _ in policy.overrides]
    for path in dict.fromkeys(paths):
        i = deciding_rule(policy.overrides, path)
        if i is not None:
            hits[i].append(path)
    return [(pattern, h) for (pattern, _), h in zip(policy.overrides, hits, strict=True)]


def describe_rule_hits(policy: Policy, paths: Iterable[str], limit: int = 6) -> str:
    """One line per override: `REGEX -> POLICY: N modules (a, b, ...)`; '' without overrides."""
    lines = []
    for (pattern, sub), (_, hit) in zip(policy.overrides, rule_hits(policy, paths), strict=True):
        shown = ", ".join(hit[:limit]) + (", ..." if len(hit) > limit else "")
        target = sub.dtypes_str(explicit_quant=True)
        lines.append(f"{pattern} -> {target}: {len(hit)} module(s) ({shown or 'none'})")
    return "; ".join(lines)


def check_rules(policy: Policy, paths: Iterable[str]) -> list[str]:
    """Warns (UserWarning) about each override that decides no module; returns their regexes.

    A rule that matches nothing (a typo, a module this model lacks, or one that only an earlier
    rule's modules match) changes nothing, which should never pass silently.
    """
    paths = list(dict.fromkeys(paths))
    dead = [pattern for pattern, hit in rule_hits(policy, paths) if not hit]
    for pattern in dead:
        examples = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        warnings.warn(
            f"Policy override {pattern!r} matches no module of this model (or only modules "
            f"that an earlier rule decides), so it changes nothing. Module paths here: "
            f"{examples}. Fix the regex (it must fully match a path or an ancestor) or drop it.",
            UserWarning,
            stacklevel=3,
        )
    return dead


def check_stacked_layers(policy: Policy, paths: Iterable[str], template: str, layers: list[str]):
    """Refuses overrides that differ between layers built once and stacked (`scan_layers`).

    The stacked layers are created once, at the path `template` (e.g. "blocks/0"), so they all
    share the policies resolved there. For every recorded path under `template`, each layer's
    own path (`layers[i]` + the rest) must resolve to the same policy and quantization;
    otherwise a per-layer override ("blocks/1/.*->fp32") would be silently ignored.
    Records the per-layer paths (`note_paths`) so that `rule_hits` sees every layer.

    Raises:
      ValueError: naming the rule, the layers it splits, and the fix.
    """
    inside = [p for p in dict.fromkeys(paths) if p == template or p.startswith(template + "/")]
    for path in inside:
        rest = path[len(template) :]
        ref = (policy.for_module(path), policy.quant_for(path))
        for layer in layers:
            other = layer + rest
            if (policy.for_module(other), policy.quant_for(other)) != ref:
                i = deciding_rule(policy.overrides, other)
                j = deciding_rule(policy.overrides, path)
                rule = policy.overrides[i if i is not None else j][0]
                raise ValueError(
                    f"Policy override {rule!r} treats {other!r} differently from {path!r}, but "
                    f"with model.scan_layers=True all {len(layers)} layers are stacked under "
                    "one policy. Set model.scan_layers=False for per-layer overrides, or write "
                    "a rule that matches every layer alike (e.g. 'blocks/.*/attn/.*->fp32')."
                )
        note_paths(layer + rest for layer in layers if layer != template)
