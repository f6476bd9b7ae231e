"""The ``cullmt-ray`` command: search, compare, calibrate, experts, evaluate, pareto, heal, submit.
Thin: parse, load config, call; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("cullmt_ray")

DESCRIPTION = """\
cullmt-ray finds smaller multilingual MT models: it removes layers (or experts), scores each
candidate with spBLEU/chrF++ on a parallel dev set using Ray actors, searches for the prune
sets that keep quality, and exports the Pareto front of size vs score.

With no config, every command uses the embedded default: the shipped dense reference model
(NLLB architecture) on the shipped demo dev set (eng/deu/fra/ces).
"""

EPILOG = """\
examples:
  cullmt-ray search                                   # greedy search on the embedded default
  cullmt-ray search search_spaces/nllb_600m.yaml --set search.threshold=1.0
  cullmt-ray search --strategy beam --set search.options.beam.width=4 --target-removed 3
  cullmt-ray search --resume results/runs/demo-dense-20261123-181700
  cullmt-ray compare --strategies greedy,beam,evolutionary,tpe,nsga2,random --target-removed 3
  cullmt-ray compare --table results/bench/ground_truth/dense.parquet --seeds 30 --strategies greedy,hybrid,tpe
  cullmt-ray calibrate --calibration from-english --calibration to-english --target-removed 3
  cullmt-ray evaluate --remove enc.3,dec.1            # score one prune set against the baseline
  cullmt-ray evaluate --dev ../shared/data/multi30k --split test_2016_flickr --max-sentences all
  cullmt-ray pareto results/runs/demo-dense-20261123-181700
  cullmt-ray report results/runs/demo-dense-20261123-181700   # report.html + sensitivity heatmap
  cullmt-ray heal results/runs/demo-dense-20261123-181700 --config search_spaces/heal_demo.yaml --candidate best
  cullmt-ray submit --address http://127.0.0.1:8265 --follow -- search --target-removed 2   # on a Ray cluster

output: progress lines on stdout ([cullmt-ray] ...), -q shows only warnings and errors, -v adds
debug lines and Ray's own logs (hidden otherwise); errors are one line on stderr.

exit codes: 0 done; 2 bad input (config, flags, data, model, units: nothing is left half-written);
1 a failure while running (an actor that keeps dying, a lost cluster; the run folder says
"failed" and `search --resume RUN_DIR` finishes it). `--resume` refuses a run whose config.yaml was
edited since it started (--accept-config-changes goes on) or whose driver still runs.

racing: `search` with greedy or beam races each step's candidates on CPU by default (search.racing: auto:
a paired bootstrap at 99% confidence drops clearly worse ones early; in every benchmark run the same
decisions and Pareto front as full scoring); --set search.racing=false scores every candidate in full.

environment: CULLMT_NO_PROGRESS=1 hides progress bars; CULLMT_DEBUG=1 shows the traceback of an
error; CULLMT_ALLOW_DOWNLOAD=1 lets sacrebleu download the flores200 SentencePiece model;
CULLMT_GREEDY_LOOP=0 decodes with HF generate instead of the faster greedy loop (same outputs);
RAY_ADDRESS joins that Ray cluster instead of starting a local one.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML search space (search_spaces/*.yaml); default: embedded demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set search.threshold=1.5 (repeatable)")
    p.add_argument("--model", help="model: reference:dense, a hub name, or a local path")
    p.add_argument("--dev", help="dev set: builtin:demo, hub:flores_plus, a directory or a .tsv/.jsonl/.parquet")
    p.add_argument("--split", help="file prefix in a dev directory, e.g. val or test_2016_flickr")
    p.add_argument("--languages", help="comma-separated language codes (eng_Latn or en)")
    p.add_argument("--directions", help="all | english-centric | comma-separated src-tgt list")
    p.add_argument("--max-sentences", help="sentences per language (a number, or 'all')")
    p.add_argument("--metric", help="primary metric: spbleu | chrf++ | bleu")
    p.add_argument("--spm", help="SentencePiece model for spBLEU: flores200 | reference | PATH")
    p.add_argument("--actors", type=int, help="evaluator actors (default: one per GPU, else one per CPU)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001, host:6379; http://host:8265 runs "
                                      "the command as a Ray job, see submit); default: start locally")
    p.add_argument("--store", help="results store: a SQLite file (default results/store.sqlite) or a shared "
                                    "PostgreSQL database postgresql://USER[:PASSWORD]@HOST[:PORT]/DB")


def _strategy_names() -> tuple[str, ...]:
    from .strategies import STRATEGIES

    return tuple(STRATEGIES)


def _search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, help="stop when the score drops more than this many points")
    p.add_argument("--target-removed", type=int, help="units to remove (the size fixed-size strategies search at)")
    p.add_argument("--protect", help="comma-separated units never removed, e.g. enc.0,dec.5")
    p.add_argument("--output", help="folder for run folders (default results/runs)")
    p.add_argument("--name", help="run name (folder prefix)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="cullmt-ray", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"cullmt-ray {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug lines, Ray's logs, tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    names = " | ".join(_strategy_names())
    s = sub.add_parser("search", help="search prune sets; writes a run folder with trace and Pareto front",
                       description="Search prune sets with the configured strategy (greedy = CULL-MT) and write "
                                   "a run folder: config, trace, held-out scores, pareto.{csv,json,parquet,png}.")
    _common(s)
    _search_flags(s)
    s.add_argument("--strategy", help=f"search strategy: {names} (default greedy)")
    s.add_argument("--max-evaluations", type=int, help="budget: distinct candidates the strategy may ask for")
    s.add_argument("--resume", metavar="RUN_DIR", help="resume a killed run: evaluations already stored are reused")
    s.add_argument("--accept-config-changes", action="store_true",
                   help="with --resume: go on although the run folder's config.yaml was edited since the run "
                        "started (its scores then go under a new store key); refused otherwise")
    c = sub.add_parser("compare", help="run several strategies on one pool and store with the same budget; report",
                       description="Run strategies with the same budget (greedy's, unless --budget) on one evaluator "
                                   "pool and store; write compare.{md,json}, fronts.png and progress.png.")
    _common(c)
    _search_flags(c)
    c.add_argument("--strategies", default="greedy,beam,evolutionary,tpe,nsga2,random",
                   help="comma-separated strategies (default: all but motpe); greedy runs first and sets the budget")
    c.add_argument("--budget", type=int, help="distinct candidates per strategy (default: what greedy used)")
    c.add_argument("--resume", metavar="RUN_DIR", help="finish a killed comparison in its folder: stored evaluations "
                                                       "are reused, and the report counts the work of every attempt")
    c.add_argument("--accept-config-changes", action="store_true",
                   help="with --resume: go on although the folder's config.yaml was edited since it started")
    c.add_argument("--seeds", type=int, default=1, help="run the comparison once per search.seed 0..N-1 and report "
                                                         "median/IQR per strategy (live models; with --table: replay)")
    c.add_argument("--table", metavar="FILE", help="replay the strategies against a ground-truth table (Parquet, e.g. "
                                                  "results/bench/ground_truth/dense.parquet) instead of a model: "
                                                  "regret vs the exact optimum over --seeds seeds, in seconds")
    c.add_argument("--sizes", help="with --table: comma-separated prune-set sizes to study (default: the table's, up to 4)")
    k = sub.add_parser("calibrate", help="search once per calibration choice; score every result on all directions",
                       description="Run the strategy once per calibration choice (the directions candidates are "
                                   "scored on) and score each chosen prune set on all configured directions; write "
                                   "calibration.{md,json,png}.")
    _common(k)
    _search_flags(k)
    k.add_argument("--strategy", help=f"search strategy: {names} (default greedy)")
    k.add_argument("--calibration", dest="calibrations", action="append", metavar="CHOICE",
                   help="all | from-english | to-english | into:LANG | from:LANG | src-tgt,... (repeatable; "
                        "default: all, from-english, to-english)")
    x = sub.add_parser("experts", help="language-specific expert pruning of NLLB-MoE from gate statistics; report",
                       description="Collect gate statistics per direction, remove experts at each rate "
                                   "(experts.rates) as the gate statistics say, score every pruned model on its "
                                   "direction; write gate_stats.json and experts.{md,json,csv}.")
    _common(x)
    x.add_argument("--output", help="folder for run folders (default results/runs)")
    x.add_argument("--name", help="run name (folder prefix)")
    x.add_argument("--rates", help="comma-separated fractions of experts removed (default 0.25,0.5,0.75,0.8)")
    x.add_argument("--stats-split", help="split of the dev set the gate statistics come from, e.g. val")
    x.add_argument("--export", action="append", default=[], metavar="DIRECTION@RATE",
                   help="save the model pruned for that direction and rate, e.g. eng_Latn-deu_Latn@0.5 (repeatable)")
    e = sub.add_parser("evaluate", help="score the baseline and one prune set, per direction",
                       description="Score the unpruned model and (with --remove) one prune set on the dev set.")
    _common(e)
    e.add_argument("--remove", default="", help="comma-separated units to remove, e.g. enc.3,dec.1")
    e.add_argument("--json", dest="json_out", help="also write the scores to this JSON file")
    e.add_argument("--export", metavar="DIR", help="save the pruned model there (loads with transformers)")
    p = sub.add_parser("pareto", help="(re)export the Pareto front of a run folder or a whole store",
                       description="Write pareto.{csv,json,parquet,png} for a run folder, or for every "
                                   "evaluation context of a results store (one folder per context).")
    p.add_argument("run_dir", help="a run folder made by cullmt-ray search, or a results store (.sqlite file or "
                                    "postgresql://...)")
    p.add_argument("--store", help="results store; default: the one the run used")
    p.add_argument("--out", help="output folder (default: the run folder)")
    r = sub.add_parser("report", help="(re)write a run folder's report.html and sensitivity heatmap",
                       description="Write report.html (Pareto plot, per-direction scores with signatures, trace, "
                                   "held-out scores, calibration) and sensitivity.{csv,png} (the metric drop of each "
                                   "direction when one unit is removed alone) for a finished search run folder.")
    r.add_argument("run_dir", help="a run folder made by cullmt-ray search")
    r.add_argument("--store", help="results store; default: the one the run used")
    j = sub.add_parser("submit", help="run a command (search, compare, ...) on a Ray cluster as a Ray job",
                       description="Send a cullmt-ray command and its arguments to a running Ray cluster through the "
                                   "Ray Jobs API, with this checkout as the working directory. The cluster's token "
                                   "comes from --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                                   "~/.ray/auth_token; it is never logged nor stored in the job.",
                       epilog="example: cullmt-ray submit --address http://127.0.0.1:8265 --follow -- search "
                              "--target-removed 2")
    j.add_argument("--address", help="the cluster: http(s)://HOST:8265 (dashboard), auto, ray://HOST:10001 or "
                                     "HOST:6379 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)")
    j.add_argument("--token-file", help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, "
                                        "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    j.add_argument("--working-dir", help="folder uploaded as the job's working directory (default: this checkout)")
    j.add_argument("--no-working-dir", action="store_true", help="upload nothing: cullmt-ray is installed on the cluster")
    j.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="pip requirement installed for the job (repeatable), or one requirements.txt; pin torch "
                        "yourself")
    j.add_argument("--submission-id", help="job id (default: cullmt-COMMAND-UTCTIME-XXXX)")
    j.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra job metadata")
    j.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its outcome")
    j.add_argument("--attach", metavar="SUBMISSION_ID", help="do not submit: follow (or show) this job")
    j.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                   help="the cullmt-ray command to run and its arguments")
    _heal_parser(sub)
    return ap


def _heal_parser(sub) -> None:
    h = sub.add_parser("heal", help="heal pruned candidates of a search run (KD + LoRA with Ray Train); export them",
                       description="Heal candidates of a finished search: the unpruned model translates the training "
                                   "corpus (cached KD data), LoRA adapters are fine-tuned on the pruned model with Ray "
                                   "Train, merged, and saved with a model card (loads with plain transformers). "
                                   "Writes RUN_DIR/heal/<name>-<UTC time>/.")
    h.add_argument("run_dir", nargs="?", help="a run folder made by cullmt-ray search")
    h.add_argument("--config", help="heal recipe, e.g. search_spaces/heal_demo.yaml (default: built-in defaults)")
    h.add_argument("--candidate", action="append", default=[], metavar="ID|best|pareto",
                   help="best (the run's final prune set, default), pareto (every pruned point of its front), a "
                        "candidate id from pareto.csv, or units like enc.1,enc.3 (repeatable)")
    h.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set lora.r=8 (repeatable)")
    h.add_argument("--mix", help="training targets: kd (teacher translations) | refs (human references) | both")
    h.add_argument("--lora-r", type=int, help="LoRA rank")
    h.add_argument("--target-modules", help="comma-separated LoRA target modules, or auto")
    h.add_argument("--workers", type=int, help="Ray Train workers per candidate")
    h.add_argument("--keep-adapter", action="store_true", help="also keep the unmerged adapter (+ the pruned base)")
    h.add_argument("--name", help="heal name (folder prefix)")
    h.add_argument("--out", help="heal folder (default RUN_DIR/heal/<name>-<UTC time>)")
    h.add_argument("--address", help="Ray cluster address (default: the search run's)")
    h.add_argument("--resume", metavar="HEAL_DIR", help="finish a killed heal: KD cache and checkpoints are reused")


def _overrides(args: argparse.Namespace) -> list[str]:
    o = list(args.overrides)
    simple = {"model": "model.name", "dev": "data.dev", "split": "data.split", "languages": "data.languages",
              "directions": "data.directions", "metric": "metric.primary", "spm": "metric.spm",
              "actors": "resources.actors", "address": "resources.address", "store": "output.store",
              "strategy": "search.strategy", "threshold": "search.threshold",
              "target_removed": "search.target_removed", "protect": "search.protect", "output": "output.dir",
              "name": "name", "max_evaluations": "search.max_evaluations"}
    for attr, key in simple.items():
        v = getattr(args, attr, None)
        if v is not None:
            o.append(f"{key}={v}")
    if args.max_sentences is not None:
        o.append("data.max_sentences=null" if args.max_sentences == "all" else f"data.max_sentences={args.max_sentences}")
    return o


def cmd_search(args: argparse.Namespace) -> int:
    from .config import load_config
    from .search import run_search
    from .session import load_run_config

    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        log.info("resuming %s", run_dir)
        run_search(cfg, run_dir, accept_config_changes=args.accept_config_changes)
    else:
        run_search(load_config(args.config, _overrides(args)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .config import load_config

    if args.resume:
        from .session import load_run_config

        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        log.info("resuming %s", run_dir)
        run_compare(cfg, None, None, run_dir, accept_config_changes=args.accept_config_changes)
        return 0
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    bad = [n for n in names if n not in _strategy_names()]
    if bad or not names:
        raise ValueError(f"--strategies: {bad[0] if bad else args.strategies!r} is not a strategy; expected a "
                         f"comma-separated list of {', '.join(_strategy_names())}")
    if args.budget is not None and args.budget < 1:
        raise ValueError(f"--budget={args.budget}: expected a positive number of evaluations")
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}: expected at least 1")
    if args.table:
        from .replay import run_replay

        try:
            sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else None
        except ValueError:
            raise ValueError(f"--sizes {args.sizes!r}: expected comma-separated numbers, e.g. 1,2,3,4") from None
        cfg = load_config(args.config, _overrides(args))
        out = Path(args.output or cfg.output.dir) / f"{args.name or 'replay'}-{Path(args.table).stem}"
        run_replay(args.table, names, seeds=args.seeds, budget=args.budget, sizes=sizes, out_dir=out,
                   options=cfg.search.options, log=log.info)
        return 0
    if args.seeds > 1:
        from .compare_seeds import run_compare_seeds

        run_compare_seeds(load_config(args.config, _overrides(args)), names, args.seeds, args.budget)
        return 0
    run_compare(load_config(args.config, _overrides(args)), names, args.budget)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import run_calibration_study
    from .config import load_config

    cfg = load_config(args.config, _overrides(args))
    run_calibration_study(cfg, args.calibrations or ["all", "from-english", "to-english"])
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    from .config import load_config
    from .expert_study import run_expert_study

    extra = [f"experts.rates=[{args.rates}]"] if args.rates else []
    extra += [f"experts.stats_split={args.stats_split}"] if args.stats_split else []
    cfg = load_config(args.config, [*_overrides(args), *extra])
    if args.config is None and not any(o.startswith("model.name=") for o in _overrides(args)):
        cfg.model.name = "reference:moe"  # the embedded default, with the shipped MoE model
    run_expert_study(cfg, args.export)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .atomic import write_json
    from .candidate import BASELINE, Candidate
    from .config import load_config
    from .session import open_session

    from .model_files import model_units

    cfg = load_config(args.config, _overrides(args))
    removed = Candidate.parse(args.remove)
    _, units = model_units(cfg.model.name, cfg.model.family, cfg.model.trust_remote_code)
    bad = [u for u in removed.units if u not in units]
    if bad:
        raise ValueError(f"--remove: {bad[0]!r} is not a unit of {cfg.model.name}; its units are {', '.join(units)}")
    from .session import check_output_dir

    if args.json_out:
        if Path(args.json_out).is_dir():
            raise ValueError(f"--json {args.json_out}: is a folder; expected a file name")
        check_output_dir(Path(args.json_out).parent, "--json")
    if args.export:
        check_output_dir(args.export, "--export")
    with open_session(cfg, "evaluate", folder=False) as session:
        evals = session.evaluate([BASELINE] if not removed.removed else [BASELINE, removed], "evaluate")
        report = {"model": cfg.model.name, "dev": cfg.data.dev, "split": cfg.data.split,
                  "sentences": session.calibration.description["eval"]["sentences"], "signatures": session.signatures,
                  "results": [{"removed": e.candidate.units, "params": e.params, "bytes": e.bytes,
                               "score": e.score, "metrics": e.metrics, "cached": e.cached} for e in evals]}
        _print_eval(report, cfg.metric.scored)
        if args.json_out:
            write_json(args.json_out, report)
        if args.export:
            import ray

            card = {"scores": report["results"], "signatures": session.signatures, "dev": cfg.data.dev}
            ray.get(session.pool.actors[0].export.remote(removed.units, str(Path(args.export).resolve()), card))
            print(f"pruned model saved to {args.export}")
    return 0


def _print_eval(report: dict, metrics: list[str]) -> None:
    print(f"model {report['model']}  dev {report['dev']}{' / ' + report['split'] if report['split'] else ''}  "
          f"({report['sentences']} sentences per language)")
    for r in report["results"]:
        label = "baseline" if not r["removed"] else "removed " + ",".join(r["removed"])
        print(f"\n{label}: {r['params'] / 1e6:.2f}M params, {r['bytes'] / 2**20:.1f} MiB")
        dirs = [d for d in r["metrics"][metrics[0]] if d != "mean"]
        print(f"  {'direction':<22}" + "".join(f"{m:>10}" for m in metrics))
        for d in dirs + ["mean"]:
            print(f"  {d:<22}" + "".join(f"{r['metrics'][m][d]:>10.2f}" for m in metrics))
    print()
    for m, sig in report["signatures"].items():
        print(f"{m}: {sig}")


def cmd_pareto(args: argparse.Namespace) -> int:
    from .pareto import export_context, export_store
    from .session import load_run_config
    from .store import ResultStore

    target = Path(args.run_dir)
    if "://" in args.run_dir:  # a database URL: a results store, fronts under --out (default ./pareto)
        with ResultStore(args.run_dir, read_only=True) as store:
            files = export_store(store, Path(args.out or "pareto"))
    elif target.is_file():  # a results store: one front per evaluation context
        with ResultStore(target, read_only=True) as store:
            files = export_store(store, Path(args.out or target.parent / "pareto"))
    else:
        cfg = load_run_config(target, flag="pareto")
        try:
            info = json.loads((target / "run.json").read_text())
        except (OSError, ValueError):
            raise ValueError(f"pareto {target}: no readable run.json; expected a run folder made by cullmt-ray") from None
        if "context" not in info or info.get("status") != "finished":
            from .session import driver_alive

            gone = info.get("status") == "running" and not driver_alive(info)
            raise ValueError(f"pareto {target}: the run has not finished (status {info.get('status')}"
                             f"{', left by a driver that is gone' if gone else ''}); "
                             f"finish it with cullmt-ray {'compare' if info.get('verb') == 'compare' else 'search'} --resume {target}")
        trace = json.loads((target / "trace.json").read_text()) if (target / "trace.json").exists() else None
        with ResultStore(args.store or cfg.output.store, read_only=True) as store:
            files = list(export_context(store, info["context"], Path(args.out or target),
                                        f"{cfg.model.name} on {cfg.data.dev}", trace, cfg.search.threshold).values())
    for f in files:
        print(f)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .session import load_run_config
    from .store import ResultStore

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir, flag="report")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if info.get("status") != "finished" or "context" not in info:
        raise ValueError(f"report {run_dir}: the run has not finished (status {info.get('status')}); "
                         f"finish it with cullmt-ray search --resume {run_dir}")
    with ResultStore(args.store or cfg.output.store, read_only=True) as store:
        print(write_report(run_dir, store, f"{cfg.model.name} on {cfg.data.dev}"))
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from .heal import load_heal_config, resume_heal, run_heal

    if args.resume:
        log.info("resuming %s", args.resume)
        heal_dir = resume_heal(args.resume)
    else:
        if not args.run_dir:
            raise ValueError("heal: expected a search run folder (RUN_DIR), or --resume HEAL_DIR")
        sets = list(args.overrides)
        flags = {"mix": "mix", "lora_r": "lora.r", "target_modules": "lora.target_modules",
                 "workers": "resources.workers", "name": "name", "address": "resources.address"}
        sets += [f"{key}={getattr(args, attr)}" for attr, key in flags.items() if getattr(args, attr) is not None]
        if args.keep_adapter:
            sets.append("export.keep_adapter=true")
        cfg = load_heal_config(args.config, sets)
        heal_dir = run_heal(args.run_dir, args.candidate or ["best"], cfg, args.out)
    log.info("healed models and cards: %s", heal_dir)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import run_submit

    return run_submit(args)


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[cullmt-ray] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if args.quiet:
        os.environ["CULLMT_NO_PROGRESS"] = "1"
    if not args.verbose:  # Ray's startup notices and worker lines
        os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
        logging.getLogger("ray").setLevel(logging.ERROR)


def _terminate_as_interrupt() -> None:
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: the run folder says "interrupted", the
    pool and the store's claims are released, instead of the process vanishing with run.json "running"."""
    import signal
    import threading

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _exit_code(e: BaseException) -> tuple[int, BaseException]:
    """2 for bad input (a ValueError, also when raised inside an actor), 1 for failures at run time."""
    from ray.exceptions import RayTaskError

    if isinstance(e, RayTaskError) and e.cause is not None:
        e = e.cause
    return (2 if isinstance(e, (ValueError, KeyError)) else 1), e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    saved = (log.handlers[:], log.level, log.propagate)  # restored on return: main() may run inside a program
    _configure_logging(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _terminate_as_interrupt()
    try:
        return _run(args, argv)
    finally:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    try:
        if args.command != "submit" and str(getattr(args, "address", None) or "").startswith(("http://", "https://")):
            from .submit import forward

            return forward(list(sys.argv[1:] if argv is None else argv), args.address)
        commands = {"search": cmd_search, "compare": cmd_compare, "calibrate": cmd_calibrate,
                    "evaluate": cmd_evaluate, "pareto": cmd_pareto, "submit": cmd_submit, "experts": cmd_experts,
                    "heal": cmd_heal, "report": cmd_report}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"cullmt-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends as one line and an exit code
        if args.verbose or os.environ.get("CULLMT_DEBUG") == "1":
            raise
        code, e = _exit_code(e)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if code == 1:
            msg = f"{msg} ({type(e).__name__}; -v shows the traceback)"
        print(f"cullmt-ray {args.command}: error: {msg}", file=sys.stderr)
        return code


def run() -> None:
    """The console script (and ``python -m cullmt_ray.cli``): :func:`main`, then Ray's local cluster shut down and
    a quick exit. By then everything a run keeps is written (atomically) and closed; what is skipped is the
    interpreter's teardown of torch, transformers and Ray's modules (~1 s of every command). Under a profiler or a
    coverage tracer (which write at exit) it exits as usual."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    try:
        if "ray" in sys.modules:
            from .session import stop_ray

            stop_ray()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    run()
