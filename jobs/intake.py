"""Intake poller entrypoint (the Kubernetes CronJob runs it; it also runs by hand).

``python -m jobs.intake --config intake.yaml [--json]``: one poll. Lists new samples under the
configured prefix (an image each, or a sub-folder of images once it holds ``_READY``) or manifest,
submits each not-yet-done sample as a scoring job (Ray job server or KubeRay RayJob; up to
``batch_size`` samples per job, so a job's start-up is paid once per batch), retries failed ones on
later polls and quarantines those that used up ``max_attempts``. The rules are in
:mod:`slidescore.intake` and docs/kubernetes.md §7.

Exit codes: 0 the poll completed (per-sample problems are in the summary and under
``<output>/_quarantine/``), 1 the job backend or the storage failed mid-poll (the next poll
continues safely), 2 usage, config or model error (nothing was submitted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.error

from slidescore.errors import ConfigError, ModelLoadError, SlideScoreError

EXIT_OK, EXIT_BACKEND, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.intake", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="intake YAML (intake_prefix, manifest, output, sample_folders, settle_s, max_in_flight, max_attempts, batch_size, "
                        "submit, ...)")
    p.add_argument("--json", action="store_true", help="print the poll summary as one JSON object (last line of stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from slidescore.intake import load_intake_config, load_job_config, make_backend, poll
    from slidescore.model import load_model
    from slidescore.stages.plan import check_config_for_model

    try:
        cfg = load_intake_config(args.config)
        job_cfg = load_job_config(cfg)
        # the card and checksum make the run key; the weights stay on the CPU and are not used
        model = load_model(job_cfg.model.name, card=job_cfg.model.card, device="cpu")
        check_config_for_model(job_cfg, model.card)
        backend = make_backend(cfg)
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = poll(cfg, job_cfg, backend, model_checksum=model.checksum, card=model.card)
    except (SlideScoreError, OSError, RuntimeError, urllib.error.URLError) as e:
        print(f"error: poll stopped, the next one continues where it left off: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BACKEND
    for line in summary.lines():
        print(line)
    if args.json:
        print(json.dumps(summary.to_dict(), sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
