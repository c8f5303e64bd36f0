"""What several test modules share: tiny models, route-job setups, hand-made runs, fault injection."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
