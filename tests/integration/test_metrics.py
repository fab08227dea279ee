"""The operations metrics on a gateway of its own (so every count is exact): latency histograms
for token verification, DIMSE operations, the PACS's answers and HTTP requests; cache hits and
misses; the age of each issuer's keys; instances and bytes relayed per protocol and direction."""

import requests

from conftest import Gateway, stop
from test_dimse_store_get import connect, get, get_query, own
from test_introspection import metric_values


def test_metrics_tell_latency_caches_key_age_and_what_was_relayed(tmp_root, orthanc, issuer):
    d = tmp_root / "metrics"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="metrics-gateway")
    try:
        mine = own(orthanc, "PAT-A")
        study = mine[0][1]
        in_study = [x for x in mine if x[1] == study]
        token = issuer.mint(patient="PAT-A")
        for _ in range(2):
            received = []
            assoc = connect(g, token, received)
            assert get(assoc, get_query("STUDY", study=study)) == (0x0000, len(in_study))
            assoc.release()
        r = requests.get(f"{g.public_url}/dicom-web/studies/{study}", timeout=60,
                         headers={"Authorization": f"Bearer {token}", "Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200 and r.content.count(b"DICM") == len(in_study)
        assert requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": "Bearer nonsense"}, timeout=10).status_code == 401

        m = metric_values(g)
        flow = lambda p, d: m.get(f'pacsgate_relayed_instances_total{{protocol="{p}",direction="{d}"}}', 0)
        size = lambda p, d: m.get(f'pacsgate_relayed_bytes_total{{protocol="{p}",direction="{d}"}}', 0)
        assert flow("dimse", "retrieve") == 2 * len(in_study)
        assert flow("dicomweb", "retrieve") == len(in_study)
        # The same instances, as data sets on DIMSE and as Part 10 files (with their meta) on DICOMweb.
        assert 0 < size("dimse", "retrieve") / 2 < size("dicomweb", "retrieve")
        assert flow("dimse", "store") == flow("dicomweb", "store") == 0

        # Latency: one observation per verification, operation and request.
        assert m['pacsgate_token_verify_seconds_count{result="valid"}'] == 3
        assert m['pacsgate_token_verify_seconds_count{result="refused"}'] == 1
        assert m['pacsgate_dimse_operation_seconds_count{operation="C-GET"}'] == 2
        assert m['pacsgate_pacs_request_seconds_count{kind="dicomweb"}'] >= 1
        assert m['pacsgate_pacs_request_seconds_count{kind="lookup"}'] >= 1
        assert m['pacsgate_http_request_seconds_count{class="2xx"}'] >= 1
        assert m['pacsgate_http_request_seconds_count{class="4xx"}'] == 1
        assert m['pacsgate_dimse_operation_seconds_bucket{le="+Inf",operation="C-GET"}'] == 2
        # Caches: the study's owner was looked up once, then found in the cache; the issuer's
        # keys were fetched once and reused.
        assert m['pacsgate_cache_requests_total{cache="ownership",result="miss"}'] >= 1
        assert m['pacsgate_cache_requests_total{cache="ownership",result="hit"}'] >= 1
        assert m['pacsgate_cache_requests_total{cache="keys",result="hit"}'] >= 2
        age = m[f'pacsgate_issuer_keys_age_seconds{{issuer="{issuer.url}"}}']
        assert 0 <= age < 120
        text = requests.get(f"{g.public_url}/metrics", timeout=10).text
        assert "PAT-" not in text and study not in text and token not in text
    finally:
        stop(g.proc)
