"""The report's privacy-audit parts: the verdict on the DP claim, the warning
banner when an audit twin's attack proved more than its accounted ε, the audit
section and the glance row's note (from the `audit` stage's `metrics.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dpsynth.report import page
from dpsynth.report.page import Section, esc, figure, table
from dpsynth.report.statement import delta_text, epsilon_text
from dpsynth.report.values import pct, read_json, read_png


def audit_verdict(m: Mapping[str, Any]) -> tuple[str, str]:
    """The audit's verdict on the claim, as the page words it: (verdict, reason)."""
    status = m.get("audit_status", "passed" if m["audit_passed"] else "failed")
    if status == "inconclusive":
        return f"inconclusive at ε = {epsilon_text(m['claimed_epsilon'])}", (
            f"{m['num_canaries']} canaries at {m['confidence']:.0%} confidence and δ = "
            f"{delta_text(m['delta'])} can certify at most ε = "
            f"{m['audit_max_certifiable_epsilon']:.2f}, so no attack could refute this claim")
    return ("passed" if status == "passed" else "FAILED"), ""


def audit_warning(audit_dir: Path | None) -> str | None:
    """A banner when an audit twin's attack proved more than its accounted ε: the DP
    code may be broken."""
    m = read_json(audit_dir, "metrics.json")
    if m is None:
        return None
    failed = [(name, m[f"{key}_epsilon_lower_bound"], m[eps])
              for name, key, eps, status in (
                  ("a twin of the fine-tuning run", "membership", "audit_epsilon",
                   m.get("audit_status", "passed" if m["audit_passed"] else "failed")),
                  ("the check twin", "check", "check_epsilon", m.get("check_status")))
              if status == "failed"]
    if not failed:
        return None
    name, bound, eps = failed[0]
    return (f"The privacy audit FAILED: an attack proved ε ≥ {bound:.2f} for {name} "
            f"accounted at ε = {epsilon_text(eps)}. The DP implementation may be broken: do "
            "not release this model or its samples before finding out why.")


def audit_section(audit_dir: Path | None) -> Section:
    m = read_json(audit_dir, "metrics.json")
    if m is None:
        return Section("audit", "Empirical privacy audit",
                       page.not_run("audit", "empirical privacy check"))
    verdict, why = audit_verdict(m)
    body = [f"<p>A twin of the fine-tuning run (same start, same DP-SGD code, same (ε, δ) "
            f"target) was trained on {m['num_canaries']} public noise images, each included "
            "at random with probability ½; a membership attack then guessed which were "
            f"included (Steinke, Nasr & Jagielski 2023). The ε it proves at "
            f"{m['confidence']:.0%} confidence is {m['membership_epsilon_lower_bound']:.2f}, "
            f"against the twin's accounted ε = {epsilon_text(m['audit_epsilon'])}: "
            f"<strong>{esc(verdict)}</strong>"
            + (f" ({esc(why)})." if why else " (the proven ε must not exceed the accounted "
               "one).")
            + " The twins read public data only: they spent none of the private budget.</p>"]
    if "check_epsilon_lower_bound" in m:
        check = {"passed": "passed", "failed": "FAILED"}.get(m["check_status"],
                                                              m["check_status"])
        can = ("an ε this audit can refute" if m["check_status"] != "inconclusive" else
               f"which this audit cannot refute either (it certifies at most ε = "
               f"{m['audit_max_certifiable_epsilon']:.2f}: lower audit.check_epsilon or add "
               "canaries)")
        body.append(
            f"<p>A check twin, the same run with σ calibrated to ε = "
            f"{epsilon_text(m['check_epsilon'])} instead, {esc(can)}, gives "
            f"{m['check_epsilon_lower_bound']:.2f}: <strong>{esc(check)}</strong>. It runs "
            "the released code path, so a broken mechanism (noise missing, clipping "
            "wrong) would show here even where the claim itself is too large to test.</p>")
    if "control_epsilon_lower_bound" in m:
        power = ("so the attack does detect membership when nothing protects it"
                 if m["audit_has_power"] else
                 "so with these audit settings the attack is weak and a pass says little "
                 "(raise audit.steps, audit.lr or audit.num_canaries)")
        body.append(f"<p>The same training without clipping and noise (a non-private control) "
                    f"gives {m['control_epsilon_lower_bound']:.2f}, {power}. A one-run audit "
                    "gives a lower bound only: it cannot confirm a large ε, but catches a "
                    "broken mechanism.</p>")
    rows = [("DP twin", f"{m['membership_epsilon_lower_bound']:.2f}",
             f"{m['membership_auc']:.2f}", pct(m["membership_tpr_at_1pct_fpr"]),
             pct(m["membership_tpr_at_5pct_fpr"]))]
    if "check_epsilon_lower_bound" in m:
        rows.append((f"check twin (ε = {epsilon_text(m['check_epsilon'])})",
                     f"{m['check_epsilon_lower_bound']:.2f}", f"{m['check_auc']:.2f}",
                     pct(m["check_tpr_at_1pct_fpr"]), pct(m["check_tpr_at_5pct_fpr"])))
    if "control_epsilon_lower_bound" in m:
        rows.append(("non-private control", f"{m['control_epsilon_lower_bound']:.2f}",
                     f"{m['control_auc']:.2f}", pct(m["control_tpr_at_1pct_fpr"]),
                     pct(m["control_tpr_at_5pct_fpr"])))
    body.append(table(["model", "ε lower bound", "AUC", "TPR at 1% FPR", "TPR at 5% FPR"],
                      rows, numeric=(1, 2, 3, 4)))
    png = read_png(audit_dir, "roc.png")
    if png is not None:
        body.append(figure(png, "ROC curves of the membership attack on log-log axes, DP "
                                "twins and non-private control, with the chance diagonal",
                           "The attack's ROC curves; chance is the dotted diagonal."))
    if "memorized_fraction" in m:
        body.append(
            "<h3>Memorization</h3>"
            '<p><span class="label nodp">computed on the private data, not covered by (ε, δ)'
            "</span> Share of synthetic images that are near-copies of a private image (their "
            "nearest private image is closer than ⅓ of the second nearest; Carlini et al. "
            "2023), against the same test on held-out real images. Only these aggregates "
            "leave the audit.</p>"
            + table(["measure", "value"], [
                ("near-copies of a private image", pct(m["memorized_fraction"])),
                ("near-copies of a held-out image (baseline)",
                 pct(m["heldout_memorized_fraction"])),
                ("samples closer to the private than to the held-out data",
                 f"{pct(m['closer_to_private_fraction'])} (about 50% when nothing is copied)"),
                ("median nearest-neighbour distance: private / held-out",
                 f"{m['nn_distance_private_median']:.3g} / "
                 f"{m['nn_distance_heldout_median']:.3g}")], numeric=(1,)))
    return Section("audit", "Empirical privacy audit", "".join(body))


def audit_glance_note(m: Mapping[str, Any], weak: bool) -> str:
    """The glance row's note: the proven ε, why an inconclusive audit is one, and the
    check twin's verdict."""
    verdict, why = audit_verdict(m)
    note = f"proven ε ≥ {m['membership_epsilon_lower_bound']:.2f}"
    if verdict.startswith("inconclusive"):
        note += (f": {m['num_canaries']} canaries at {m['confidence']:.0%} and δ = "
                 f"{delta_text(m['delta'])} certify at most ε = "
                 f"{m['audit_max_certifiable_epsilon']:.2f}")
    if "check_status" in m:
        check = {"failed": "FAILED"}.get(m["check_status"], m["check_status"])
        note += f"; check twin {check} at ε = {epsilon_text(m['check_epsilon'])}"
    return note + ("; a weak audit (see below)" if weak else "")
