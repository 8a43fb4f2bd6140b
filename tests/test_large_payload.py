"""A 600 MB payload (more than a full SmolLM2 task vector, 538 MB) crosses a TLS deployment on
loopback both ways, intact (issue 21): deploy/payload_check is a Flower app that only moves data.
Marked ``deployment``; its times are printed (README "Scale out" quotes them), never asserted."""

from __future__ import annotations

import json

import pytest

from tests.test_deployment import REPO, Loopback


@pytest.mark.deployment
@pytest.mark.slow
def test_a_600_mb_payload_crosses_the_deployment_both_ways(tmp_path):
    deployment = Loopback(tmp_path)
    out = tmp_path / "payload.json"
    try:
        deployment.supernode("supernode0", "partition-id=0 num-partitions=1")
        deployment.wait_for_nodes(1)
        run = deployment.flwr("run", str(REPO / "deploy" / "payload_check"), "edge", "--stream", "--run-config",
                              f'megabytes=600 nodes=1 out="{out}"', timeout=600)
        assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:] + deployment.logs[0].read_text()[-3000:]
        result = json.loads(out.read_text())
        print("payload check:", json.dumps(result))
        (reply,) = result["replies"]
        assert "error" not in reply, reply
        assert reply["down_intact"] and reply["up_intact"], reply
    finally:
        deployment.close()
