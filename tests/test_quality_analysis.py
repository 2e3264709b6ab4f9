"""The quality benchmark's analysis, planning, run keys and target domains, on synthetic rows
and files (pure functions: no model, no training; seconds)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import methods as M  # noqa: E402
import quality as Q  # noqa: E402


def run(method: str, lr: float, seed: int, general: float, domain: float, kind: str | None = None) -> dict:
    """A result row as ``quality.run_one`` records it (the fields the analysis reads)."""
    kind = kind or method.split("-")[0]
    return {"method": method, "kind": kind, "label": method, "lr": lr, "seed": seed, "general_ppl": general,
            "domain_ppl": domain, "method_config": {"kd_weight": 0.5 if method.endswith("kd") else 0.0},
            "trainable_params": 1, "curve": [(0, domain)]}  # fmt: skip


def on_line(log_general: float, a: float, b: float) -> float:
    """Domain perplexity on the straight line log domain = a + b log general."""
    return math.exp(a + b * log_general)


def test_frontier_interpolates_in_log_space_and_never_extrapolates():
    pts = [(1e-3, 4.0, 5.6), (3e-3, 4.2, 5.4), (1e-2, 4.5, 5.3)]
    assert Q.frontier_at(pts, 4.1) == pytest.approx(5.5)
    assert Q.frontier_at(pts, 4.2) == 5.4  # a point itself, exactly
    assert Q.frontier_at(pts, 4.35) == pytest.approx(5.35)
    assert Q.frontier_at(pts, 3.9) is None and Q.frontier_at(pts, 4.6) is None
    assert Q.frontier_at(pts[:1], 4.0) == 5.6 and Q.frontier_at(pts[:1], 4.01) is None
    # general perplexity not monotone in the lr: the path in lr order crosses 4.3 twice (at 5.3
    # and 5.35); the lower value wins (ordered by general ppl instead, the points give 5.35)
    bent = [(1e-3, 4.0, 5.6), (3e-3, 4.4, 5.2), (1e-2, 4.2, 5.5)]
    assert Q.frontier_at(bent, 4.3) == pytest.approx(5.3)
    assert Q.frontier_at(list(reversed(bent)), 4.3) == pytest.approx(5.3)  # by lr, not by input order


def test_matched_forgetting_pairs_by_seed_and_flags_outside():
    """A LoRA frontier that is a straight line in log-log space, with another offset per seed;
    the reference forgets differently per seed, so only pairing by seed gives the known answer."""
    lrs = (1e-4, 3e-4, 1e-3)
    offsets = {0: 0.10, 1: -0.05, 2: 0.02}
    ref_general = {0: 60.0, 1: 64.0, 2: 66.0}
    ref_domain = {0: 230.0, 1: 240.0, 2: 235.0}
    results = [run("base", 1e-3, 0, 59.0, 320.0)]
    for seed in offsets:
        results.append(run("nexus", 1e-3, seed, ref_general[seed], ref_domain[seed]))
        results.append(run("nexus", 3e-3, seed, ref_general[seed] * 1.1, ref_domain[seed] * 0.95))
        for i, lr in enumerate(lrs):
            general = 58.0 + 6.0 * i  # 58, 64, 70: the references lie inside
            results.append(
                run("lora", lr, seed, general, on_line(math.log(general), 9.0 + offsets[seed], -0.8))
            )
        # esft: one seed's frontier does not reach the reference's forgetting
        scale = 1.0 if seed != 1 else 1.5
        results += [
            run("esft", lr, seed, g * scale, 250.0 - i)
            for i, (lr, g) in enumerate([(1e-3, 59.0), (3e-3, 70.0)])
        ]
    matched = Q.matched_forgetting(results, "nexus", 1e-3)
    assert "base" not in matched
    deltas = {
        seed: 9.0 + offsets[seed] - 0.8 * math.log(ref_general[seed]) - math.log(ref_domain[seed])
        for seed in offsets
    }
    lora = matched["lora"]
    assert lora["per_seed"] == pytest.approx(deltas)
    mean, std, n = lora["delta_nats"]
    values = list(deltas.values())
    assert n == 3 and mean == pytest.approx(sum(values) / 3)
    assert std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    ppl = [math.exp(deltas[s] + math.log(ref_domain[s])) for s in offsets]
    assert lora["domain_ppl"][0] == pytest.approx(sum(ppl) / 3)
    assert lora["lrs"] == list(lrs) and lora["outside"] == {}
    # the reference on its own frontier: exactly 0
    assert matched["nexus"]["per_seed"] == {0: 0.0, 1: 0.0, 2: 0.0}
    esft = matched["esft"]
    assert esft["outside"] == {1: "forgets more at every lr"}  # its general ppl is 88.5..105 there
    assert sorted(esft["per_seed"]) == [0, 2] and esft["delta_nats"][2] == 2
    table = Q.matched_table(matched, "nexus@0.001", 63.3)
    row = next(line for line in table.splitlines() if line.startswith("| esft"))
    assert "2/3" in row and "outside, seed 1: forgets more at every lr" in row
    # a method outside on every seed: no number at all, "outside" instead
    alone = Q.matched_forgetting(
        [r for r in results if r["method"] != "esft" or r["seed"] == 1], "nexus", 1e-3
    )
    assert alone["esft"]["delta_nats"] is None
    row = next(line for line in Q.matched_table(alone, "ref", None).splitlines() if line.startswith("| esft"))
    assert row.count("outside") == 3  # the two value cells and the note
    # a seed without a reference run is left out
    assert Q.matched_forgetting(results, "nexus", 1e-2) == {}


def test_lr_brackets_warn_when_the_best_lr_is_at_an_end_of_its_grid():
    rows = Q.summarise([
        run("base", 1e-3, 0, 59.0, 320.0),
        run("nexus", 1e-3, 0, 65.0, 235.0), run("nexus", 3e-3, 0, 69.0, 220.0), run("nexus", 1e-2, 0, 75.0, 225.0),
        run("lora", 3e-4, 0, 63.0, 246.0), run("lora", 1e-3, 0, 73.0, 225.0),
        run("esft", 3e-3, 0, 67.0, 252.0),
    ])  # fmt: skip
    brackets = Q.lr_brackets(rows)
    assert brackets == {
        "nexus": {"lrs": [1e-3, 3e-3, 1e-2], "best": 3e-3, "bracketed": True},
        "lora": {"lrs": [3e-4, 1e-3], "best": 3e-4, "bracketed": False},
    }
    warning = Q.unbracketed_warning(brackets)
    assert (
        warning.startswith("WARNING")
        and "lora (0.0003 of 0.0003..0.001)" in warning
        and "nexus" not in warning
    )
    assert Q.unbracketed_warning({"nexus": brackets["nexus"]}) is None


def test_plan_runs_each_methods_lr_grid_for_every_seed():
    args = Q.parse_args(["--grid", "--methods", "base", "nexus", "lora-r11-kd", "--seeds", "0", "1"])
    runs = [(m.name, m.lr, s) for m, s in Q.plan(args)]
    assert runs[0] == ("base", 1e-3, 0) and ("base", 1e-3, 1) not in runs  # the base once
    for seed in (0, 1):
        assert [lr for n, lr, s in runs if n == "nexus" and s == seed] == list(Q.GRIDS["nexus"])
        assert [lr for n, lr, s in runs if n == "lora-r11-kd" and s == seed] == list(Q.GRIDS["lora"])
    assert Q.parse_args(["--grid"]).methods == Q.FRONTIER_METHODS
    # --lrs: that grid (exact values), with or without --grid; other methods keep one lr
    args = Q.parse_args(
        ["--methods", "nexus", "esft-gate-kd", "--lrs", "esft-gate-kd=1e-3,1e-2", "--seeds", "0"]
    )
    assert [(m.name, m.lr) for m, _ in Q.plan(args)] == [("nexus", M.NEXUS_LR), ("esft-gate-kd", 1e-3),
                                                         ("esft-gate-kd", 1e-2)]  # fmt: skip
    # the quick mode scales the grid like every other lr; the sweep is seed 0 only
    quick = Q.plan(Q.parse_args(["--quick", "--grid", "--methods", "full-ft"]))
    assert [m.lr for m, _ in quick] == [Q.scaled(lr, 3) for lr in Q.GRIDS["full"]]
    assert Q.scaled(0.003, 3) == 0.009  # as typed, so that --lrs finds the same runs
    sweep = Q.plan(Q.parse_args(["--sweep-lr"]))
    assert {s for _, s in sweep} == {0} and {m.name for m, _ in sweep} == set(Q.SWEEP_METHODS)
    with pytest.raises(SystemExit):
        Q.lr_grids(["nexus"])


def test_defaults_held_out_size_and_out_dirs():
    args = Q.parse_args([])
    assert args.eval_tokens == 65_536 and Q.parse_args(["--quick"]).eval_tokens == 2048
    assert args.out == ROOT / "benchmarks" / "results" / "quality"  # docstrings: the existing layout
    other = Q.parse_args(["--domain", "readmes"])
    assert other.out == ROOT / "benchmarks" / "results" / "quality" / "readmes"
    assert other.work != args.work  # the NEXUS inits come from the domain's own router statistics
    assert set(Q.DEFAULT_METHODS) >= {"lora-r11-kd", "esft-token-kd", "esft-gate-kd"}


def test_esft_and_lora_have_kd_but_full_fine_tuning_does_not():
    for name in ("esft-token-kd", "esft-gate-kd", "lora-r11-kd"):
        assert M.get_method(name).kd_weight == M.METHODS["nexus"].kd_weight
    assert M.get_method("esft-gate-kd").esft_score == "gate"
    # the benchmark's reference is the pipeline's default: TrainConfig's KD weight and lr
    from nexus.stages.train.config import TrainConfig

    fields = TrainConfig.model_fields
    assert M.get_method(Q.DEFAULT_METHOD).kd_weight == fields["kd_weight"].default
    assert fields["lr"].default == Q.DEFAULT_LR
    for name in ("esft-token-kd1", "esft-gate-kd1", "lora-r11-kd1"):  # at the default NEXUS's KD weight
        assert M.get_method(name).kd_weight == M.get_method(Q.DEFAULT_METHOD).kd_weight == 1.0
        assert M.get_method(name).esft_score == M.get_method(name.removesuffix("1")).esft_score
    with pytest.raises(ValueError, match="second copy"):
        M.METHODS["full-ft"].with_(kd_weight=0.5)
    # NEXUS variants: the default's KD at another shared-expert width, or with ESFT's experts
    wide, both = M.get_method("nexus-kd1-w2"), M.get_method("nexus-kd1-w0.5-esft2")
    assert (wide.kd_weight, wide.width, wide.unfreeze) == (1.0, 2.0, 0)
    assert (both.width, both.unfreeze, both.esft_score) == (0.5, 2, "gate")
    keys = {M.adapter_key(m) for m in (M.get_method(Q.DEFAULT_METHOD), wide, both)}
    assert len(keys) == 3 and M.adapter_key(M.get_method(Q.DEFAULT_METHOD)) == "pca-scalar-top4"
    with pytest.raises(ValueError, match="averaged inits"):
        wide.with_(init="zero")
    # the gate, router and temperature variants; the temperature reaches nexus train's config
    sig, hot = M.get_method("nexus-kd1-sigmoid-router"), M.get_method("nexus-kd1-t2")
    assert (sig.gate, sig.train_router, sig.temperature, hot.gate, hot.temperature) == (
        "sigmoid",
        True,
        1,
        "scalar",
        2,
    )
    assert M.adapter_key(sig) == "pca-sigmoid-top4" and M.adapter_key(hot) == "pca-scalar-top4"
    lora = M.get_method("lora-r11-kd1-t2")
    assert (lora.rank, lora.kd_weight, lora.temperature) == (11, 1.0, 2.0)
    cfg = M.train_config(lora, "m", seed=0, steps=1, batch_size=1, seq_len=8, warmup_steps=0)
    assert cfg.kd_temperature == 2.0 and cfg.kd_weight == 1.0
    assert (M.get_method("lora-experts-r12-kd1").lora_on, lora.lora_on) == ("experts", "attn+experts")
    with pytest.raises(ValueError, match="lora_on"):
        lora.with_(lora_on="mlp")


def test_run_keys_carry_the_harness_version_and_old_runs_stay_readable(tmp_path):
    recorded = [json.loads(line) for line in (ROOT / "benchmarks/results/quality/results.jsonl").open()][:5]
    for r in recorded:  # runs recorded before versions: their key is the version-free one
        method = M.Method(**r["method_config"])
        assert Q.run_key(method, r["seed"], r["settings"]) == r["key"]
        assert Q.run_key(method, r["seed"], r["settings"], "abc") != r["key"]
    new = {**recorded[0], "key": "versioned", "key_any": recorded[0]["key"], "code_version": "abc"}
    assert Q.index_runs([*recorded, new], any_version=True)[recorded[0]["key"]] is new  # the latest wins
    assert Q.index_runs([*recorded, new])["versioned"] is new
    # the recorded hash of the code follows the contents of the code files
    for rel in ("benchmarks/quality.py", "nexus/stages/train/core.py", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    version = Q.code_hash(tmp_path)
    (tmp_path / "README.md").write_text("not code\n")
    assert Q.code_hash(tmp_path) == version
    (tmp_path / "nexus/stages/train/core.py").write_text("x = 2\n")
    assert Q.code_hash(tmp_path) != version


def test_an_esft_run_is_copied_from_its_twin_only_when_both_scores_choose_the_same_experts():
    class Inits:  # the production selections are NexusInits.esft_experts: per layer, top-k experts
        def __init__(self, token, gate):
            self.chosen = {"frequency": token, "gate": gate}

        def esft_experts(self, score, k):
            return self.chosen[score]

    settings, code = {"steps": 1}, "v"
    token = M.get_method("esft-token-kd1").with_(lr=0.01)
    run = {
        "key": Q.run_key(token, 0, settings, code),
        "domain_ppl": 7.0,
        "esft_experts": {"0": [4], "1": [1]},
    }
    done = {run["key"]: run}
    gate = M.get_method("esft-gate-kd1").with_(lr=0.01)
    same = Inits({0: [4], 1: [1]}, {0: [4], 1: [1]})
    twin = Q.esft_twin(gate, 0, settings, code, done, same)
    assert twin["domain_ppl"] == 7.0 and twin["same_run_as"] == run["key"]
    assert twin["method"] == "esft-gate-kd1" and twin["method_config"]["esft_score"] == "gate"
    assert Q.esft_twin(gate, 0, settings, code, done, Inits({0: [4], 1: [1]}, {0: [4], 1: [2]})) is None
    assert Q.esft_twin(gate, 1, settings, code, done, same) is None  # another seed: not recorded
    assert Q.esft_twin(gate.with_(lr=0.003), 0, settings, code, done, same) is None
    assert Q.esft_twin(M.get_method("esft-gate-kd").with_(lr=0.01), 0, settings, code, done, same) is None
    assert Q.esft_twin(M.get_method("lora-r11"), 0, settings, code, done, same) is None


def _fake_demo_corpus(path: Path) -> Path:
    """A directory with what a domain takes from the demo corpus: the general splits and the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nexus.demo.corpus import FORMAT

    path.mkdir()
    for split in ("general", "general_heldout"):
        pq.write_table(pa.table({"text": [f"def {split}(): pass"], "source": ["x.py"], "kind": ["code"]}),
                       path / f"{split}.parquet")  # fmt: skip
    (path / "manifest.json").write_text(json.dumps({"format": FORMAT, "content_sha256": "0" * 64}))
    return path


@pytest.mark.parametrize("name", ["readmes", "c-headers"])
def test_domains_are_split_by_source_and_cached_by_content(tmp_path, name):
    import pyarrow.parquet as pq

    from nexus.demo import corpus, domains

    domain = domains.get_domain(name)
    splits = domains.split_documents(domain)
    assert splits == domains.split_documents(domain)  # deterministic
    train, held = ({r["source"] for r in splits[s]} for s in ("domain", "domain_heldout"))
    assert train and held and not train & held  # a source is in exactly one split
    # split by the demo corpus's own source hash, at the domain's held-out share
    assert all(corpus.heldout(s, domain.heldout_permille) for s in held)
    assert not any(corpus.heldout(s, domain.heldout_permille) for s in train)
    assert not any(s.endswith("nexus-moe") for s in train | held)  # not the project's own README

    demo = _fake_demo_corpus(tmp_path / "corpus")
    assert domains.ensure_domain("docstrings", demo, tmp_path / "cache") == demo
    out = domains.ensure_domain(name, demo, tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "demo" and out.name.startswith(f"domain-{name}-")
    assert pq.read_table(out / "domain_heldout.parquet").num_rows == len(splits["domain_heldout"])
    assert (out / "general_heldout.parquet").read_bytes() == (demo / "general_heldout.parquet").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["domain"] == name and manifest["splits"]["domain"]["rows"] == len(splits["domain"])
    mtime = (out / "domain.parquet").stat().st_mtime_ns
    assert domains.ensure_domain(name, demo, tmp_path / "cache") == out  # cached: not rewritten
    assert (out / "domain.parquet").stat().st_mtime_ns == mtime
    with pytest.raises(Exception, match="unknown domain"):
        domains.get_domain("nope")


def test_nexus_inits_steps_are_exclusive_across_processes_sharing_work(tmp_path):
    """--shard processes share the inits' work directory: each step holds an exclusive flock
    (the second process waits, then finds the first one's output), re-entrant within one object."""
    import threading

    a, b = (M.NexusInits("model", ["corpus"], tmp_path) for _ in range(2))  # two open files: as two processes
    events, entered = [], threading.Event()

    def hold(inits, name):
        # nested: a step calling another step (selection -> stats_dir)
        with inits._exclusive(), inits._exclusive():
            events.append(f"{name} in")
            entered.set()
            time.sleep(0.2)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=(a, "a"))
    first.start()
    entered.wait()
    second = threading.Thread(target=hold, args=(b, "b"))
    second.start()
    first.join()
    second.join()
    assert events == ["a in", "a out", "b in", "b out"]
    assert (tmp_path / "inits.lock").is_file()


def test_across_table_reads_each_domains_matched_forgetting():
    def entry(delta, seeds, lrs=(1e-3, 3e-3), kd=1.0):
        return {"lrs": list(lrs), "seeds": seeds, "kd_weight": kd, "delta_nats": delta}

    summaries = {
        "docstrings": {
            "reference": {"method": "nexus-kd1", "lr": 3e-3},
            "matched_forgetting": {
                "nexus-kd1": entry((0.0, 0.0, 3), [0, 1, 2]),
                "lora-r11": entry((0.0421, 0.003, 3), [0, 1, 2], kd=0.0),
                "nexus@one-lr": entry((0.5, 0.0, 1), [0], lrs=(1e-3,)),  # no frontier: not shown
            },
        },
        "readmes": {
            "reference": {"method": "nexus-kd1", "lr": 3e-3},
            "matched_forgetting": {"nexus-kd1": entry((0.0, 0.0, 1), [0]), "esft-token": entry(None, [0, 1])},
        },
    }
    rows = {
        line.split(" | ")[0][2:]: line
        for line in Q.across_table(summaries).splitlines()
        if line.startswith("| ")
    }
    assert rows["lora-r11"] == "| lora-r11 | - | +0.042 ± 0.003 (3/3) | - |"
    assert rows["esft-token"] == "| esft-token | 1 | - | outside (0/2) |"
    assert rows["nexus-kd1"] == "| nexus-kd1 | 1 | +0.000 ± 0.000 (3/3) | +0.000 (1/1) |"
    assert "nexus@one-lr" not in rows


def test_frontier_plot_keeps_its_axes_on_the_runs_that_did_not_diverge():
    """One diverged learning rate (general perplexity far above the base's) must not squash
    every frontier: the axes end near the others, and the note says how many lie beyond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"general_ppl": g, "domain_ppl": d} for g, d in ((90, 300), (95, 250), (100, 240), (700, 650))]
    fig, ax = plt.subplots()
    Q._clip(ax, rows, Q.DIVERGED * 88)
    assert 85 < ax.get_xlim()[0] < 90 and 100 < ax.get_xlim()[1] < 110 and ax.get_ylim()[1] < 320
    assert [t.get_text() for t in ax.texts] == [
        "1 run(s) with general perplexity over 132 (diverged) beyond the axes"
    ]
    fig, ax = plt.subplots()
    Q._clip(ax, rows[:3], 132.0)  # nothing diverged: matplotlib's own limits, no note
    assert not ax.texts
    plt.close("all")
