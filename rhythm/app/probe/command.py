"""``rhythm probe --model M --prompts FILE_OR_BUILTIN [--n N] [--out DIR]``: the parser and the command."""
from __future__ import annotations

import sys

from rhythm.app.probe.text import printable as _terminal


def add_parser(sub, add_common, add_chat_template, positive_int):
    p = sub.add_parser("probe", help="run the paper's tests of the preplan-and-anchor rhythm on a model")
    add_common(p)   # its --seed also seeds the random control's positions and the bootstrap
    p.add_argument("--prompts", default="builtin",
                   help="'builtin' (32 grade-school math problems) or a .jsonl ({'prompt': ..., 'id': ...} per "
                        "line) / .txt (one prompt per line) file (default: builtin)")
    p.add_argument("--n", type=positive_int, default=None, help="probe the first N prompts (default: all)")
    p.add_argument("--trials", type=positive_int, default=2,
                   help="perturbation trials of each kind (high-FAI, low-FAI, random) per response (default: 2)")
    p.add_argument("--min-after", type=positive_int, default=32,
                   help="a perturbed position needs at least this many response tokens after it (default: 32)")
    p.add_argument("--max-new-tokens", type=positive_int, default=160, help="response length cap (default: 160)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per generation batch (default: 32); prompts run, and are written, in groups of "
                        "batch-size // (3 trials + 1)")
    add_chat_template(p)
    p.add_argument("--out", default="reports/probe", help="output folder (default: reports/probe/); reruns resume")
    p.set_defaults(func=cmd_probe)
    return p


def _summary_lines(result: dict) -> list[str]:
    s = result["summary"]
    pert, paper = s["perturbation"], s["paper"]
    hl, hp = pert["high_vs_low"], pert["high_vs_low_by_prompt"]
    share = "–" if hl["share_less"] is None else f"{hl['share_less']:.1%}"
    fmt = lambda x: "–" if x is None else f"{x:.3f}"   # noqa: E731
    lines = [f"prompts {s['prompts']} ({s['with_trials']} with trials); replay identical "
             f"{pert['replay']['identical']}/{pert['replay']['n']}",
             f"Jaccard high-FAI vs low-FAI: {fmt(hl['mean_a'])} vs {fmt(hl['mean_b'])} over {hl['n']} trial pairs "
             f"(paper {paper['jaccard_high']} vs {paper['jaccard_low']}); high deviates more in {share} "
             f"(paper {paper['high_deviates_more']:.2%}); sign p {fmt(hl['sign_p'])}, Wilcoxon p {fmt(hl['wilcoxon_p'])}; "
             f"per prompt (n {hp['n']}) Wilcoxon p {fmt(hp['wilcoxon_p'])}"]
    for name, label in (("waad_peaks", "WAAD peaks"), ("preplan", "preplan tokens")):
        c = s["coupling"][name]["near"]
        lift = "–" if c["lift"] is None else f"{c['lift']:.2f}"
        lines.append(f"anchors at or just after {label}: lift {lift} ({c['observed']} vs {c['expected']:.1f} "
                     f"expected), permutation p {fmt(c['p'])}")
    e = s["entropy"]
    lines.append(f"entropy at WAAD peaks vs others: {fmt(e['peaks_vs_others']['mean_a'])} vs "
                 f"{fmt(e['peaks_vs_others']['mean_b'])} (Wilcoxon p {fmt(e['peaks_vs_others']['wilcoxon_p'])}); "
                 f"mean Spearman rho {fmt(e['spearman']['mean'])}")
    h = s["heads"]
    if h.get("responses"):
        g = h["groups"]
        lines.append(f"heads: local d {g['local']['distance']:.2f} (sink {g['local']['sink']:.3f}), global d "
                     f"{g['global']['distance']:.2f} (sink {g['global']['sink']:.3f}, d without sink "
                     f"{g['global']['distance_no_sink']:.2f})")
    return lines


def cmd_probe(args) -> int:
    from pathlib import Path

    from rhythm.app import cli
    from rhythm.app.common import UsageError, apply_threads, check_writable_dir
    from rhythm.app.probe.prompts import PromptError, load_prompts
    from rhythm.app.probe.run import PAGE, RESULT, ProbeError, ProbeSettings, run_probe

    try:   # the cheap checks first: the prompts file, then the model's path and config
        prompts, source = load_prompts(args.prompts)
        settings = ProbeSettings(k=args.trials, min_after=args.min_after, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, seed=args.seed, chat_template=args.chat_template)
    except (PromptError, ProbeError) as e:
        raise UsageError(str(e)) from None
    if args.n is not None:
        prompts = prompts[:args.n]
    check_writable_dir(Path(args.out), "--out", create=True)
    model_source = cli.check_common(args)
    scorer = cli.scorer_knobs(args)
    model_source.check(scorer["layers"])         # the checks that read the model's config
    apply_threads(args.threads)
    console = model_source.console
    meta = {"model": model_source.model_id(), "dtype": args.dtype, "source": source}
    model, tokenizer = model_source.load(device=args.device, dtype=args.dtype)
    with console.progress(total=len(prompts), desc="probing", unit="prompt") as bar:
        try:
            result = run_probe(model, tokenizer, prompts, settings=settings, scorer_settings=scorer, out=args.out,
                               meta=meta, progress=bar.update)
        except ProbeError as e:
            raise UsageError(str(e)) from None
    for line in _summary_lines(result):
        print(_terminal(line))
    out = Path(args.out)
    print(f"\npage: {_terminal(out / PAGE)}\njson: {_terminal(out / RESULT)}", file=sys.stdout)
    return 0
