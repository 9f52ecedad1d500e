"""The data card: ingest's report.json as a short text a person reads before training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import vocabulary


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


def summary(report: dict, root: Path | None = None, positive_class: str | None = None) -> str:
    """Images per class and split, formats, duplicates and every problem found; paths relative to ``root``;
    for two classes, which is positive (``evaluate.positive_class``, or the default) and how to change it."""

    def rel(path: str) -> str:
        return (
            str(Path(path).relative_to(root))
            if root is not None and Path(path).is_relative_to(root)
            else path
        )

    counts = report["counts"]
    per_class = {c: sum(counts[s][c] for s in counts) for c in report["classes"]}
    cache = report["cache"]
    dups = report["duplicates"]
    lines = [
        f"{report['n_images']} images, {len(report['classes'])} classes "
        f"({len(report['rejected'])} unreadable skipped, {report['ignored_non_images']} non-image files ignored)",
        f"  per class   {_counts(per_class)}",
        *(f"  {split:11s} {_counts(c)}" for split, c in counts.items()),
        f"  split by    {report['split_by']}"
        + (f", {report['folds']} folds" if report["folds"] else "")
        + (f"; groups from {report['groups_from']}" if report.get("groups_from") else ""),
        f"  modes       {_counts(report['formats']['mode'])}",
        f"  bit depths  {_counts(report['formats']['bits'])}",
        f"  sizes       {_counts(report['formats']['size'])}",
        f"  cache       {report['image_size']}x{report['image_size']}, {cache['channels']} channels "
        f"(data.channels: {cache['policy']}), {cache['dtype']}",
        *([f"  size        {report['image_size_reason']}"] if report.get("image_size_reason") else []),
        f"  duplicates  {dups['n_exact_sets']} sets of identical files, {dups['n_near_sets']} sets of near duplicates"
        + (
            " (kept in one split)"
            if report["split_by"] != "manifest" and dups["n_near_sets"] + dups["n_exact_sets"]
            else ""
        ),
    ]
    lines += positive(report["classes"], positive_class)
    excluded = report.get("excluded") or {}
    if excluded.get("n"):
        lines.append(
            f"  excluded    {excluded['n']} files listed in {excluded['file']} (data.exclude), e.g. "
            + ", ".join(map(rel, excluded["paths"][:3]))
        )
    lines += [f"  exact:      {_few(list(map(rel, paths)))}" for paths in dups["exact"][:5]]
    lines += [f"  near:       {_few(list(map(rel, paths)))}" for paths in dups["near"][:5]]
    lines += [f"  unreadable: {rel(r['path'])}: {r['reason']}" for r in report["rejected"][:10]]
    lines += [f"  non-image:  {rel(p)}" for p in report.get("non_images", [])[:10]]
    lines += [
        f"  left out:   {', '.join(f'{rel(p)} ({label})' for p, label in zip(c['paths'], c['labels'], strict=True))} "
        "(identical files under different labels)"
        for c in report.get("label_conflicts", [])[:10]
    ]
    lines += [f"  warning:    {w}" for w in [*report["warnings"][:10], *filter(None, [upscaled(report)])]]
    return "\n".join(lines)


def positive(classes: Sequence[str], chosen: str | None) -> list[str]:
    """The card's line on a binary set's positive class (whose recall is the sensitivity), or nothing."""
    if len(classes) != 2:
        return []
    if chosen is not None:
        return [f"  positive    {chosen} (evaluate.positive_class in params.yaml)"]
    name, why = vocabulary.default_positive(classes)
    other = next(c for c in classes if c != name)
    return [
        f"  positive    {name} (evaluate.positive_class is null: {why}); its recall is the sensitivity. "
        f"To make {other} positive instead: set evaluate.positive_class: {other} in params.yaml"
    ]


def upscaled(report: dict) -> str | None:
    """A warning when images are enlarged at ingest (28 px to 64 px adds pixels, not detail), else None."""
    side = report["image_size"]
    small = {
        size: n for size, n in report["formats"]["size"].items() if min(map(int, size.split("x"))) < side
    }
    if not small:
        return None
    smallest = min(min(map(int, size.split("x"))) for size in small)
    return (
        f"{sum(small.values())} of {report['n_images']} images are smaller than data.image_size {side} (e.g. "
        f"{next(iter(small))}) and are upscaled to {side}x{side}: that adds compute, not detail (it may still "
        f"suit pretrained weights); data.image_size: {max(smallest, 16)} trains on them as they are"
    )


def _entries(entries: Sequence[Any]) -> str:
    names = [e if isinstance(e, str) else ", ".join(f"{k}: {v}" for k, v in e.items()) for e in entries]
    return "[" + "; ".join(names) + "]" if names else "[] (none)"


def augmentation(
    domain: str | None,
    preset: str,
    transforms: Sequence[dict],
    tta: Sequence[Any],
    conflicts: Sequence[str] = (),
) -> str:
    """The card's lines on the augmentation the set will train with: from ``intake --domain``, or kept."""
    how = (
        f"--domain {domain}, written to params.yaml"
        if domain
        else "kept from params.yaml (no --domain given: it may be the previous set's; see docs/training.md)"
    )
    lines = [
        f"  augment     {how}",
        f"              augment.preset {preset}, augment.transforms {_entries(transforms)}",
        f"              evaluate.tta {_entries(tta)}",
    ]
    return "\n".join([*lines, *(f"  warning:    {c}" for c in conflicts)])


def pool_summary(report: dict, root: Path | None = None) -> str:
    """The unlabelled pool's card: files kept, left out (and why) and unreadable; paths relative to ``root``."""

    def rel(path: str) -> str:
        return (
            str(Path(path).relative_to(root))
            if root is not None and Path(path).is_relative_to(root)
            else path
        )

    cache, excluded = report["cache"], report["excluded"]
    lines = [
        f"unlabelled pool {report['pool']}: {report['n_files']} image files, {report['n_kept']} kept "
        f"({len(report['rejected'])} unreadable skipped, {excluded['n']} left out, "
        f"{report['ignored_non_images']} non-image files ignored)",
        f"  modes       {_counts(report['formats']['mode'])}",
        f"  bit depths  {_counts(report['formats']['bits'])}",
        f"  sizes       {_counts(report['formats']['size'])}",
        f"  cache       {report['image_size']}x{report['image_size']}, {cache['channels']} channels "
        f"(data.channels: {cache['policy']}), {cache['dtype']}",
    ]
    if report.get("groups") or report.get("groups_from"):
        lines.append(
            f"  groups      {report['groups']} in the pool"
            + (f" (from {report['groups_from']})" if report.get("groups_from") else "")
        )
    if report["checked_against"] is None:
        lines.append("  leakage     checked against the labelled set by the pool stage (dvc repro)")
    else:
        by = f"{_counts(excluded['by_split'])}; {_counts(excluded['by_kind'])}" if excluded["n"] else "none"
        lines.append(f"  left out    {by} (duplicates of labelled images; val/test groups)")
    if report.get("exact_sets_within"):
        lines.append(
            f"  duplicates  {report['exact_sets_within']} sets of identical files within the pool (kept)"
        )
    lines += [f"  left out:   {rel(f['path'])}: {f['reason']}" for f in excluded["files"][:10]]
    lines += [f"  unreadable: {rel(r['path'])}: {r['reason']}" for r in report["rejected"][:10]]
    lines += [f"  non-image:  {rel(p)}" for p in report.get("non_images", [])[:10]]
    lines += [f"  warning:    {w}" for w in report["warnings"][:10]]
    return "\n".join(lines)


def _few(paths: list[str], shown: int = 4) -> str:
    """A duplicate set's first paths, and how many more the report lists (it keeps 20 a set)."""
    more = f", ... (+{len(paths) - shown} more listed)" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
