"""Published results the leaderboard places this study's models next to (the paper's Table V), and
the labels that say which evaluation protocol each number comes from."""

from __future__ import annotations

from dataclasses import dataclass

PAPER_CITATION = (
    "B. Tóth, D. Senti, T. M. Ingolfsson et al., EMBC 2025, arXiv:2502.17460 "
    "(best: large, unfrozen, 200 epochs)"
)
PUBLISHED_PROTOCOL = "as published (splits differ between studies)"

# How each bpfm protocol evaluates; the Table V rows name it so that numbers from a split that
# leaks subjects are never mistaken for subject-disjoint ones.
PROTOCOL_LABELS = {
    "paper": "paper: segment-level 80/10/10, subjects leak",
    "calbased": "calbased: PulseDB CalBased_Test (subjects seen in training)",
    "calfree": "calfree: PulseDB CalFree_Test (unseen subjects)",
    "aami": "aami: PulseDB AAMI_Test",
}

SOURCE_NAMES = {"mimic": "MIMIC-III", "vitaldb": "VitalDB", "other": "other"}


@dataclass(frozen=True)
class PublishedResult:
    source: str  # bpfm source name: mimic | vitaldb
    method: str
    dbp_mae: float
    sbp_mae: float
    reference: str
    protocol: str = PUBLISHED_PROTOCOL


# The paper's Table V (research/paper.md), in its order.
LITERATURE = (
    PublishedResult(
        "vitaldb", "ResUNet+Attention", 2.95, 4.64,
        "Z. Jamil et al., IEEE Sensors J. 25(1):1694-1705, 2025",
    ),
    PublishedResult(
        "vitaldb", "CiGNN", 2.79, 4.15, "L. Liu et al., IEEE JBHI 28(5):2674-2686, 2024"
    ),
    PublishedResult(
        "vitaldb", "Fusion+Attention", 3.76, 5.32,
        "C. El-Hajj et al., Biomed. Signal Process. Control 65:102301, 2021",
    ),
    PublishedResult(
        "vitaldb", "rU-Net", 2.69, 4.49, "J. Chen et al., IEEE JBHI 29(1):166-176, 2025"
    ),
    PublishedResult(
        "vitaldb", "CEReBrO fine-tuned (the paper)", 1.92, 3.14, PAPER_CITATION,
        PROTOCOL_LABELS["paper"],
    ),
    PublishedResult("mimic", "ResUNet+Attention", 1.13, 4.55, "Z. Jamil et al., 2025"),
    PublishedResult(
        "mimic", "GWO-GBRT", 2.79, 4.15,
        "S. Liu et al., Biomed. Signal Process. Control 88:105354, 2024",
    ),
    PublishedResult(
        "mimic", "Conv-LSTM", 3.29, 4.30, "B. Kamanditya et al., Sci. Rep. 14, 2024"
    ),
    PublishedResult(
        "mimic", "ResNet+LSTM", 2.23, 4.12,
        "A. Paviglianiti et al., Cognitive Computation 14(5):1689-1710, 2022",
    ),
    PublishedResult(
        "mimic", "CEReBrO fine-tuned (the paper)", 1.57, 2.72, PAPER_CITATION,
        PROTOCOL_LABELS["paper"],
    ),
)


def protocol_label(protocol: str | None) -> str:
    """The human label of a bpfm protocol (unknown names pass through)."""
    if not protocol:
        return "unknown protocol"
    return PROTOCOL_LABELS.get(protocol, protocol)
