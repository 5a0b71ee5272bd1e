"""`build --source earthaccess` offline: the CMR search answered from records shaped like the real GES_DISC ones
(`../shared/data/cmr/`), Earthdata Login answered by `responses`, the granules served by a local http.server.

Nothing of ours is monkeypatched: the real earthaccess, requests and download code run against those endpoints.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import earthaccess
import pytest
import responses
from climate_text_schema import open_dataset
from earthaccess.auth import Auth
from merra2_text_data.cli import app
from merra2_text_data.regions import parse_region
from merra2_text_data.source.synth import write_synthetic_granules
from typer.testing import CliRunner

runner = CliRunner()
REGION = "--region=-100,40,-98,42"
START, END = dt.date(2019, 1, 1), dt.date(2019, 1, 3)
SECRETS = {"EARTHDATA_USERNAME": "user-SECRETMARK1", "EARTHDATA_PASSWORD": "pw-SECRETMARK2"}
TOKEN = "tok-SECRETMARK3"
CMR = re.compile(r"https://cmr\.earthdata\.nasa\.gov/search/granules\.umm_json.*")
EDL = "https://urs.earthdata.nasa.gov"


class _Handler(SimpleHTTPRequestHandler):
    gets: list[str] = []

    def do_GET(self) -> None:
        type(self).gets.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Synthetic granules served over HTTP on 127.0.0.1; yields (base URL, folder)."""
    folder = tmp_path_factory.mktemp("served")
    write_synthetic_granules(folder, parse_region(REGION.split("=", 1)[1]), START, END, seed=11)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    finally:
        httpd.shutdown()
        httpd.server_close()


def _records(base: str, folder: Path, shared_data: Path) -> dict[str, list[dict[str, Any]]]:
    """UMM-G records for the served files, built on a real GES_DISC record (same fields, our granules)."""
    template = json.loads((shared_data / "cmr" / "GPM_3IMERGHH_umm.json").read_text())["items"][0]
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("MERRA2_*.nc4")):
        short = "M2T1NXSLV" if "_slv_" in path.name else "M2T1NXFLX"
        day = dt.datetime.strptime(path.name.split(".")[2], "%Y%m%d")
        item = copy.deepcopy(template)
        umm = item["umm"]
        umm["GranuleUR"] = f"{short}.5.12.4:{path.name}"
        umm["CollectionReference"] = {"ShortName": short, "Version": "5.12.4"}
        umm["RelatedUrls"] = [
            {"URL": f"{base}/{path.name}", "Type": "GET DATA", "Description": f"Download {path.name}"},
            {"URL": f"s3://gesdisc-cumulus-prod-protected/MERRA2/{short}.5.12.4/{path.name}",
             "Type": "GET DATA VIA DIRECT ACCESS"},
        ]  # fmt: skip
        data = path.read_bytes()
        umm["DataGranule"]["ArchiveAndDistributionInformation"] = [{
            "Name": path.name, "SizeInBytes": len(data), "Size": len(data) / 2**20, "SizeUnit": "MB",
            "Checksum": {"Value": hashlib.md5(data).hexdigest(), "Algorithm": "MD5"},
        }]  # fmt: skip
        umm["TemporalExtent"] = {"RangeDateTime": {"BeginningDateTime": f"{day:%Y-%m-%d}T00:00:00.000Z",
                                                   "EndingDateTime": f"{day:%Y-%m-%d}T23:59:59.999Z"}}  # fmt: skip
        item["meta"]["native-id"] = umm["GranuleUR"]
        out.setdefault(short, []).append(item)
    return out


@pytest.fixture
def nasa(
    server: tuple[str, Path], shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[responses.RequestsMock]:
    """CMR and Earthdata Login answered offline; a fresh earthaccess login state; no ~/.netrc."""
    records = _records(*server, shared_data)
    monkeypatch.setattr(earthaccess, "_auth", Auth())  # earthaccess keeps its login in a module global
    monkeypatch.setenv("HOME", str(server[1].parent / "home"))
    for var in ("NETRC", "EARTHDATA_TOKEN", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD"):
        monkeypatch.delenv(var, raising=False)

    def search(request: Any) -> tuple[int, dict[str, str], str]:
        query = parse_qs(urlparse(request.url).query)
        items = records.get(query["short_name"][0], [])
        assert query["version"] == ["5.12.4"]
        page = [] if query.get("page_size") == ["0"] else items
        return 200, {"CMR-Hits": str(len(items))}, json.dumps({"hits": len(items), "took": 5, "items": page})

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_passthru("http://127.0.0.1")
        mock.add_callback(responses.GET, CMR, callback=search)
        mock.add(responses.POST, f"{EDL}/api/users/find_or_create_token",
                 json={"access_token": TOKEN, "token_type": "Bearer", "expiration_date": "12/31/2030"})  # fmt: skip
        mock.add(responses.GET, f"{EDL}/profile", json={"uid": "someone"})
        yield mock


def _build(out: Path, cache: Path, *more: str) -> Any:
    return runner.invoke(app, ["build", "--source", "earthaccess", REGION, "--start", str(START), "--end", str(END),
                               "--variables", "T2M,U10M,V10M,PRECTOTCORR", "--out", str(out), "--cache", str(cache),
                               "-q", "-vv", *more])  # fmt: skip


def _no_secret(*texts: str) -> None:
    for text in texts:
        for marker in (*SECRETS.values(), TOKEN):
            assert marker not in text


def test_earthaccess_build_downloads_once_and_records_sources(
    nasa: responses.RequestsMock, server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    _Handler.gets.clear()
    res = _build(tmp_path / "ds", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    ref = res.stdout.strip().splitlines()[-1]
    ds = open_dataset(ref)
    m = ds.manifest
    served = {p.name: p for p in server[1].glob("*.nc4")}
    assert sorted(_Handler.gets) == sorted(f"/{n}" for n in served)  # each granule downloaded once
    assert {s.file for s in m.sources} == set(served) and len(m.sources) == 6
    for s in m.sources:
        data = served[s.file].read_bytes()
        assert s.granule == f"{'M2T1NXSLV' if '_slv_' in s.file else 'M2T1NXFLX'}.5.12.4:{s.file}"
        assert s.bytes == len(data) and s.checksum == f"MD5:{hashlib.md5(data).hexdigest()}"
        assert (
            tmp_path / "cache" / "granules" / s.granule.split(".")[0] / "2019" / s.file
        ).read_bytes() == data
    assert sum(m.splits.values()) == 3 and (m.model_extra or {})["source_kind"] == "synthetic"
    version_dir = Path(ds.version_url)
    assert (
        "downloaded" in res.stderr and "logged in to NASA Earthdata" in res.stderr
    )  # the debug log is checked too
    _no_secret(
        res.output,
        *(p.read_text() for p in version_dir.glob("*.json")),
        (version_dir / "README.md").read_text(),
    )
    assert "SECRETMARK" not in ds.read_index().to_csv()

    # A second build from the same cache into another store: no download (each cached file was checked against its
    # CMR checksum once; a mark records that, with its size and mtime).
    _Handler.gets.clear()
    res = _build(tmp_path / "other", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    assert _Handler.gets == [] and res.stdout.strip().splitlines()[-1].rsplit("@", 1)[1] == m.version
    # The cached files overwritten with garbage of the same size: their checksums differ, so they are downloaded
    # again (size alone used to let them through), and the build gives the same version.
    for path in (tmp_path / "cache" / "granules").rglob("*.nc4"):
        path.write_bytes(b"\0" * path.stat().st_size)
    res = _build(tmp_path / "third", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    assert (
        len(_Handler.gets) == len(m.sources)
        and res.stdout.strip().splitlines()[-1].rsplit("@", 1)[1] == m.version
    )


def test_no_credentials_names_every_way_to_give_them(nasa: responses.RequestsMock, tmp_path: Path) -> None:
    res = _build(tmp_path / "ds", tmp_path / "cache")
    assert res.exit_code == 1 and "Traceback" not in res.output
    for needle in ("EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "EARTHDATA_TOKEN", "~/.netrc"):
        assert needle in res.stderr
    assert not (tmp_path / "ds").exists() or not list((tmp_path / "ds").rglob("manifest.json"))


def test_rejected_credentials_never_echo_them(
    nasa: responses.RequestsMock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    nasa.replace(responses.POST, f"{EDL}/api/users/find_or_create_token", status=401,
                 json={"error": "invalid_credentials"})  # fmt: skip
    res = _build(tmp_path / "ds", tmp_path / "cache")
    assert res.exit_code == 1 and "rejected the credentials" in res.stderr
    _no_secret(res.output)
