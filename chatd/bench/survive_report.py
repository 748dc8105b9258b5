"""Tables and the plot of ``chatd bench survive`` (measurement is in survive.py)."""

from __future__ import annotations

from typing import Any

_CASES = (("redis_intact", "Redis intact"), ("redis_lost", "Redis lost too"))


def _num(value: Any, fmt: str) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return format(value, fmt)


def print_table(results: dict[str, Any]) -> None:
    raw_pg = results["raw_pg_commits_per_s"]
    print()
    print("Loss when the owner is SIGKILLed (B takes the replies over)")
    print(
        f"{'mode':<20}{'case':<16}{'n':>4}{'unended':>8}"
        f"{'lost chars p50/max':>20}{'lost tokens p50/max':>21}{'kill->end p50/p99':>20}"
    )
    for m in results["modes"]:
        for key, label in _CASES:
            if key not in m:
                continue
            s = m[key]
            chars = f"{_num(s['lost_chars_p50'], '.0f')}/{_num(s['lost_chars_max'], '.0f')}"
            toks = f"{_num(s['lost_tokens_p50'], '.0f')}/{_num(s['lost_tokens_max'], '.0f')}"
            ends = f"{_num(s['kill_to_end_p50_s'], '.1f')}/{_num(s['kill_to_end_p99_s'], '.1f')} s"
            unended = s["not_ended"] + s["not_committed"] + s["inconsistent"]
            print(
                f"{m['mode']:<20}{label:<16}{s['samples']:>4}{unended:>8}"
                f"{chars:>20}{toks:>21}{ends:>20}"
            )
    print()
    print(
        "Cost of generating, above the same process idle "
        f"(raw asyncpg commits/s in the same run: {raw_pg:.0f})"
    )
    print(
        f"{'mode':<20}{'tokens/s':>9}{'ckpt writes/s':>14}{'x raw':>7}"
        f"{'WAL KB/s':>10}{'chatd ms/1k tok':>16}{'pg ms/1k tok':>13}{'deliv p50/p99':>16}"
    )
    for m in results["modes"]:
        c = m["cost"]
        deliv = f"{c['delivery_p50_ms']:.0f}/{c['delivery_p99_ms']:.0f} ms"
        print(
            f"{m['mode']:<20}{c['tokens_per_s']:>9.0f}{c['checkpoint_writes_per_s']:>14.1f}"
            f"{c['checkpoint_writes_per_s'] / raw_pg:>7.3f}"
            f"{c['pg_wal_bytes_per_s'] / 1024:>10.1f}{c['chatd_cpu_ms_per_1k_tokens']:>16.0f}"
            f"{_num(c['pg_cpu_ms_per_1k_tokens'], '.0f'):>13}{deliv:>16}"
        )
    print(
        "\nunended: replies with no end, no committed message, or a committed text that is not a"
        "\nprefix of what was seen (all should be 0). lost chars: seen by a watcher, then missing"
        "\nfrom the message; lost tokens: made before the kill, then missing (seen or not)."
        "\ncost: while replies generate, minus the same process idle (CPU, WAL); ckpt writes/s:"
        "\nstatements saving partials (x raw: share of the raw commit rate measured above)."
    )


def plot(results: dict[str, Any], path: str) -> None:
    """Tokens lost (Redis lost too) against Postgres writes, one point per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install 'chatd[bench]' (matplotlib) for PNG plots")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (cost_key, label) in zip(
        axes,
        (
            ("checkpoint_writes_per_s", "checkpoint writes/s"),
            ("pg_wal_bytes_per_s", "Postgres WAL bytes/s"),
        ),
        strict=True,
    ):
        for m in results["modes"]:
            x = m["cost"][cost_key]
            for key, marker in (("redis_lost", "o"), ("redis_intact", "x")):
                if key not in m:
                    continue
                s = m[key]
                p50, top = s["lost_tokens_p50"], s["lost_tokens_max"]
                ax.errorbar(
                    [x],
                    [p50],
                    yerr=[[0], [max(0, top - p50)]],
                    fmt=marker,
                    capsize=3,
                    color="C1" if key == "redis_lost" else "C0",
                )
            shown = m.get("redis_lost") or m["redis_intact"]
            ax.annotate(m["mode"], (x, shown["lost_tokens_p50"]), fontsize=8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel(f"{label} while generating")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("tokens lost per killed reply (p50, bar to max)")
    axes[0].plot([], [], "o", color="C1", label="Redis lost too")
    axes[0].plot([], [], "x", color="C0", label="Redis intact")
    axes[0].legend()
    fig.suptitle("chatd bench survive: loss window against its cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
