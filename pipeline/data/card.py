"""The data card: ingest's report.json as a short text a person reads before training."""

from __future__ import annotations

from pathlib import Path


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


def summary(report: dict, root: Path | None = None) -> str:
    """Images per class and split, formats, duplicates and every problem found; paths relative to ``root``."""
    def rel(path: str) -> str:
        return str(Path(path).relative_to(root)) if root is not None and Path(path).is_relative_to(root) else path

    counts = report["counts"]
    per_class = {c: sum(counts[s][c] for s in counts) for c in report["classes"]}
    cache = report["cache"]
    dups = report["duplicates"]
    lines = [
        f"{report['n_images']} images, {len(report['classes'])} classes "
        f"({len(report['rejected'])} unreadable skipped, {report['ignored_non_images']} non-image files ignored)",
        f"  per class   {_counts(per_class)}",
        *(f"  {split:11s} {_counts(c)}" for split, c in counts.items()),
        f"  split by    {report['split_by']}" + (f", {report['folds']} folds" if report["folds"] else ""),
        f"  modes       {_counts(report['formats']['mode'])}",
        f"  bit depths  {_counts(report['formats']['bits'])}",
        f"  sizes       {_counts(report['formats']['size'])}",
        f"  cache       {report['image_size']}x{report['image_size']}, {cache['channels']} channels "
        f"(data.channels: {cache['policy']}), {cache['dtype']}",
        f"  duplicates  {dups['n_exact_sets']} sets of identical files, {dups['n_near_pairs']} near-duplicate pairs"
        + (" (kept in one split)" if report["split_by"] != "manifest" and dups["n_near_pairs"] + dups["n_exact_sets"]
           else ""),
    ]
    excluded = report.get("excluded") or {}
    if excluded.get("n"):
        lines.append(f"  excluded    {excluded['n']} files listed in {excluded['file']} (data.exclude), e.g. "
                     + ", ".join(map(rel, excluded["paths"][:3])))
    lines += [f"  exact:      {', '.join(map(rel, paths))}" for paths in dups["exact"][:5]]
    lines += [f"  near:       {', '.join(map(rel, d['paths']))} ({d['bits']} bits)" for d in dups["near"][:5]]
    lines += [f"  unreadable: {rel(r['path'])}: {r['reason']}" for r in report["rejected"][:10]]
    lines += [f"  warning:    {w}" for w in report["warnings"][:10]]
    return "\n".join(lines)
