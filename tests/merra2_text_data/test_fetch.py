"""Granule names, discovery in folders and on S3, the CMR search through the real earthaccess library (HTTP
intercepted, fixtures in cmr_fixtures/), Earthdata login, and resumable downloads from a local HTTP server."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import responses
from merra2_text_data.errors import ConfigError, CredentialsError, GranuleError, MissingDataError
from merra2_text_data.regions import REGIONS
from merra2_text_data.source.fetch import (
    COLLECTIONS,
    Granule,
    collection_for,
    download_granules,
    find_granules,
    login_earthaccess,
    missing_days,
    parse_granule_name,
    search_earthaccess,
)

FIXTURES = Path(__file__).parent / "cmr_fixtures"
BOTH = ["M2T1NXSLV", "M2T1NXFLX"]


# --- names and collections -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4", ("400", "tavg1_2d_slv_Nx", date(2019, 1, 1))),
        ("MERRA2_401.tavg1_2d_slv_Nx.20200915.nc4", ("401", "tavg1_2d_slv_Nx", date(2020, 9, 15))),
        ("MERRA2_100.tavg1_2d_flx_Nx.19800102.nc4", ("100", "tavg1_2d_flx_Nx", date(1980, 1, 2))),
        ("MERRA2_300.tavg1_2d_flx_Nx.20150101.nc4", ("300", "tavg1_2d_flx_Nx", date(2015, 1, 1))),
        ("MERRA2_400.tavg1_2d_slv_Nx.20210110.SUB.nc4", ("400", "tavg1_2d_slv_Nx", date(2021, 1, 10))),
        ("MERRA2_400.tavg1_2d_slv_Nx.20210110.SUB.nc", ("400", "tavg1_2d_slv_Nx", date(2021, 1, 10))),
        ("some/dir/MERRA2_200.tavg1_2d_rad_Nx.19950607.nc4", ("200", "tavg1_2d_rad_Nx", date(1995, 6, 7))),
    ],
)
def test_parse_granule_name_reads_the_stream_from_the_name(
    name: str, expected: tuple[str, str, date]
) -> None:
    assert parse_granule_name(name) == expected


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("M2T1NXSLV_geo_temporal.nc4", "not a MERRA-2 granule name"),
        ("MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4.part", "not a MERRA-2 granule name"),
        ("MERRA2_400.tavg1_2d_slv_Nx.20190230.nc4", "impossible date"),
        ("MERRA-2.tavg1_2d_flx_Nx.19800102.SUB.nc4", "GrADS Data Server"),
    ],
)
def test_parse_granule_name_rejects_other_names(name: str, fragment: str) -> None:
    with pytest.raises(GranuleError, match=fragment):
        parse_granule_name(name)


def test_collections_and_variables() -> None:
    assert COLLECTIONS["M2T1NXSLV"].product == "tavg1_2d_slv_Nx"
    assert COLLECTIONS["M2T1NXFLX"].product == "tavg1_2d_flx_Nx"
    assert len(COLLECTIONS["M2T1NXSLV"].variables) == 47
    assert collection_for("T2M") == "M2T1NXSLV" and collection_for("PRECTOTCORR") == "M2T1NXFLX"
    with pytest.raises(ConfigError, match=r"unknown MERRA-2 variable 't2m'.*T2MDEW.*PRECTOTCORR"):
        collection_for("t2m")


# --- discovery ---------------------------------------------------------------------------------------------------


def _touch(folder: Path, name: str, size: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"x" * size)
    return path


def test_find_granules_in_nested_folders_with_gaps(tmp_path: Path) -> None:
    for day in (1, 2, 4):
        _touch(
            tmp_path / "M2T1NXSLV.5.12.4" / "2019" / "01",
            f"MERRA2_400.tavg1_2d_slv_Nx.201901{day:02d}.nc4",
            7,
        )
    for day in (1, 2, 3, 4):
        _touch(tmp_path / "flx", f"MERRA2_400.tavg1_2d_flx_Nx.201901{day:02d}.nc4")
    _touch(tmp_path, "MERRA2_400.tavg1_2d_rad_Nx.20190101.nc4")  # another collection
    _touch(tmp_path, "MERRA2_400.tavg1_2d_slv_Nx.20181231.nc4")  # outside the period
    _touch(tmp_path, "notes.txt")
    granules, missing = find_granules(tmp_path, BOTH, date(2019, 1, 1), date(2019, 1, 5))
    assert [(g.collection, g.day.day) for g in granules] == [
        ("M2T1NXFLX", 1), ("M2T1NXSLV", 1), ("M2T1NXFLX", 2), ("M2T1NXSLV", 2), ("M2T1NXFLX", 3),
        ("M2T1NXFLX", 4), ("M2T1NXSLV", 4),
    ]  # fmt: skip
    assert missing == [date(2019, 1, 3), date(2019, 1, 5)]
    slv = granules[1]
    assert slv.stream == "400" and slv.size == 7 and Path(slv.url).is_file()
    assert slv.granule_id == "M2T1NXSLV.5.12.4:MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4"
    assert missing_days(granules, ["M2T1NXFLX"], date(2019, 1, 1), date(2019, 1, 4)) == []


def test_duplicate_streams_keep_the_reprocessed_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch(tmp_path, "MERRA2_400.tavg1_2d_slv_Nx.20200915.nc4")
    _touch(tmp_path, "MERRA2_401.tavg1_2d_slv_Nx.20200915.nc4")
    with caplog.at_level(logging.WARNING, logger="merra2_text_data.source.fetch"):
        granules, missing = find_granules(tmp_path, ["M2T1NXSLV"], date(2020, 9, 15), date(2020, 9, 15))
    assert [g.file_name for g in granules] == ["MERRA2_401.tavg1_2d_slv_Nx.20200915.nc4"] and missing == []
    assert "MERRA2_400.tavg1_2d_slv_Nx.20200915.nc4" in caplog.text
    assert "MERRA2_401.tavg1_2d_slv_Nx.20200915.nc4" in caplog.text


def test_grads_variant_is_rejected_unless_a_real_granule_exists(tmp_path: Path, shared_data: Path) -> None:
    grads = shared_data / "merra2-other" / "MERRA-2.tavg1_2d_flx_Nx.19800102.SUB.nc4"
    shutil.copy(grads, tmp_path / grads.name)
    with pytest.raises(GranuleError, match="GrADS Data Server"):
        find_granules(tmp_path, ["M2T1NXFLX"], date(1980, 1, 1), date(1980, 1, 3))
    granules, missing = find_granules(tmp_path, ["M2T1NXSLV"], date(1980, 1, 2), date(1980, 1, 2))
    assert granules == [] and missing == [date(1980, 1, 2)]  # not a requested collection: ignored
    _touch(tmp_path, "MERRA2_100.tavg1_2d_flx_Nx.19800102.nc4")
    granules, _ = find_granules(tmp_path, ["M2T1NXFLX"], date(1980, 1, 2), date(1980, 1, 2))
    assert [g.file_name for g in granules] == ["MERRA2_100.tavg1_2d_flx_Nx.19800102.nc4"]


def test_find_granules_request_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an existing folder"):
        find_granules(tmp_path / "nope", BOTH, date(2019, 1, 1), date(2019, 1, 2))
    with pytest.raises(ConfigError, match="unknown collection"):
        find_granules(tmp_path, ["M2I3NPASM"], date(2019, 1, 1), date(2019, 1, 2))
    with pytest.raises(ConfigError, match="before start"):
        find_granules(tmp_path, BOTH, date(2019, 1, 2), date(2019, 1, 1))


def test_find_granules_on_s3(s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for name in ("MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4", "MERRA2_400.tavg1_2d_flx_Nx.20190101.nc4"):
        fs.pipe(f"{s3_bucket}/merra2/2019/{name}", b"abc")
    granules, missing = find_granules(f"{s3_bucket}/merra2", BOTH, date(2019, 1, 1), date(2019, 1, 2))
    assert missing == [date(2019, 1, 2)]
    assert [g.url for g in granules] == [
        f"{s3_bucket}/merra2/2019/MERRA2_400.tavg1_2d_flx_Nx.20190101.nc4",
        f"{s3_bucket}/merra2/2019/MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4",
    ]
    assert all(g.size == 3 for g in granules)


# --- CMR search through earthaccess --------------------------------------------------------------------------------


class _FakeCMR:
    """Serves cmr_fixtures/<short_name>_umm.json for granules.umm_json queries, filtered by the temporal range."""

    def __init__(self) -> None:
        self.queries: list[dict[str, list[str]]] = []

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        query = parse_qs(urlparse(request.url).query)
        self.queries.append(query)
        short_name = query["short_name"][0]
        records = json.loads((FIXTURES / f"{short_name}_umm.json").read_text())["items"]
        first, last = query["temporal[]"][0].split(",")
        records = [r for r in records if r["umm"]["TemporalExtent"]["RangeDateTime"]["BeginningDateTime"][:10]
                   <= last[:10] and r["umm"]["TemporalExtent"]["RangeDateTime"]["EndingDateTime"][:10] >= first[:10]]  # fmt: skip
        page = int(query.get("page_size", ["2000"])[0])
        body = {"hits": len(records), "took": 5, "items": records[:page]}
        return 200, {"CMR-Hits": str(len(records)), "Content-Type": "application/json"}, json.dumps(body)


CMR_URL = re.compile(r"https://cmr\.earthdata\.nasa\.gov/search/granules\.umm_json.*")


def test_search_earthaccess_maps_umm_records() -> None:
    cmr = _FakeCMR()
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, CMR_URL, callback=cmr)
        granules = search_earthaccess(BOTH, date(2019, 1, 1), date(2019, 1, 2), REGIONS["conus"])
    assert [(g.collection, g.day) for g in granules] == [
        ("M2T1NXFLX", date(2019, 1, 1)), ("M2T1NXSLV", date(2019, 1, 1)),
        ("M2T1NXFLX", date(2019, 1, 2)), ("M2T1NXSLV", date(2019, 1, 2)),
    ]  # fmt: skip
    slv = granules[1]
    assert slv.file_name == "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4" and slv.stream == "400"
    assert slv.url == ("https://data.gesdisc.earthdata.nasa.gov/data/MERRA2/M2T1NXSLV.5.12.4/2019/01/"
                       "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4")  # fmt: skip
    assert slv.size == round(396.4517230987549 * 1024 * 1024) and slv.checksum is None
    assert slv.granule_id == "M2T1NXSLV.5.12.4:MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4"
    flx = granules[0]
    assert flx.size == round(389.0170297622681 * 1024 * 1024)
    assert flx.checksum is not None and flx.checksum.startswith("MD5:")
    sent = {q["short_name"][0]: q for q in cmr.queries}
    assert set(sent) == set(BOTH)
    assert sent["M2T1NXSLV"]["version"] == ["5.12.4"]
    assert sent["M2T1NXSLV"]["temporal[]"] == ["2019-01-01T00:00:00Z,2019-01-02T23:59:59Z"]
    assert sent["M2T1NXSLV"]["bounding_box"] == ["-125.0,24.0,-66.0,50.0"]


def test_search_earthaccess_cmr_failure_is_a_missing_data_error() -> None:
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, CMR_URL, status=503, body="CMR is down for maintenance")
        with pytest.raises(MissingDataError, match="CMR search for M2T1NXSLV"):
            search_earthaccess(["M2T1NXSLV"], date(2019, 1, 1), date(2019, 1, 2))


@pytest.mark.network
def test_live_cmr_search() -> None:
    """The real NASA CMR (run with -m network when Earthdata credentials exist)."""
    if not (os.environ.get("EARTHDATA_TOKEN") or os.environ.get("EARTHDATA_USERNAME")):
        pytest.skip("set EARTHDATA_TOKEN or EARTHDATA_USERNAME/EARTHDATA_PASSWORD to run the live search")
    login_earthaccess()
    granules = search_earthaccess(BOTH, date(2019, 1, 1), date(2019, 1, 2), REGIONS["conus"])
    assert len(granules) == 4 and all(g.url.startswith("https://") and g.size for g in granules)


# --- Earthdata login -------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_earthaccess(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A logged-out earthaccess, no credentials in the environment, and no ~/.netrc."""
    import earthaccess
    from earthaccess.auth import Auth

    for key in ("EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", "EARTHDATA_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setattr(earthaccess, "_auth", Auth())
    if "__store__" in vars(earthaccess):
        monkeypatch.delattr(earthaccess, "__store__")
    yield


def test_login_without_credentials_names_the_ways_to_provide_them(fresh_earthaccess: None) -> None:
    with pytest.raises(CredentialsError) as info:
        login_earthaccess()
    message = str(info.value)
    for hint in ("EARTHDATA_TOKEN", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD", ".netrc"):
        assert hint in message


def test_login_with_a_token(fresh_earthaccess: None, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("EARTHDATA_TOKEN", "tok-SECRET-123")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock, caplog.at_level(logging.DEBUG):
        mock.add(responses.GET, "https://urs.earthdata.nasa.gov/profile", json={"uid": "someone"})
        auth = login_earthaccess()
    assert auth.authenticated
    assert "tok-SECRET-123" not in caplog.text


def test_rejected_credentials_never_leak(fresh_earthaccess: None, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("EARTHDATA_USERNAME", "alice")
    monkeypatch.setenv("EARTHDATA_PASSWORD", "pw-SECRET-456")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock, caplog.at_level(logging.DEBUG):
        mock.add(responses.POST, re.compile(r"https://urs\.earthdata\.nasa\.gov/.*"), status=401,
                 json={"error": "invalid_credentials"})  # fmt: skip
        with pytest.raises(CredentialsError) as info:
            login_earthaccess()
    assert "rejected" in str(info.value)
    assert "pw-SECRET-456" not in str(info.value) and "pw-SECRET-456" not in caplog.text


# --- downloads -------------------------------------------------------------------------------------------------------


class _Server:
    """A local HTTP server for downloads: optional Range support, truncated first responses, forced status."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.truncate_first = 0  # number of responses to cut off half way
        self.status: int | None = None
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                if server.status is not None:
                    self.send_error(server.status)
                    return
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if server.ranges and self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_first > 0:
                    server.truncate_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


NAME = "MERRA2_400.tavg1_2d_slv_Nx.20190101.nc4"
PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


def _granule(server: _Server, size: int | None = len(PAYLOAD)) -> Granule:
    server.files[NAME] = PAYLOAD
    return Granule("M2T1NXSLV", date(2019, 1, 1), "400", NAME, f"{server.url}/{NAME}", size)


def _target(cache: Path) -> Path:
    return cache / "M2T1NXSLV" / "2019" / NAME


def test_download_then_skip_when_complete(server: _Server, tmp_path: Path) -> None:
    granule = _granule(server)
    with requests.Session() as session:
        done = download_granules([granule], tmp_path, session=session, backoff_s=0)
        assert done[0].url == str(_target(tmp_path)) and _target(tmp_path).read_bytes() == PAYLOAD
        assert done[0].size == len(PAYLOAD) and done[0].file_name == NAME
        assert not list(tmp_path.rglob("*.part"))
        again = download_granules([granule], tmp_path, session=session, backoff_s=0)
    assert again == done and len(server.requests) == 1


def test_resume_a_partial_file_with_a_range_request(server: _Server, tmp_path: Path) -> None:
    granule = _granule(server)
    part = _target(tmp_path).with_name(NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300_000])
    with requests.Session() as session:
        download_granules([granule], tmp_path, session=session, backoff_s=0)
    assert server.requests == [{"path": f"/{NAME}", "range": "bytes=300000-"}]
    assert _target(tmp_path).read_bytes() == PAYLOAD and not part.exists()


def test_restart_when_the_server_ignores_ranges(server: _Server, tmp_path: Path) -> None:
    server.ranges = False
    granule = _granule(server)
    part = _target(tmp_path).with_name(NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)
    with requests.Session() as session:
        download_granules([granule], tmp_path, session=session, backoff_s=0)
    assert _target(tmp_path).read_bytes() == PAYLOAD


def test_interrupted_transfer_is_retried_and_resumed(server: _Server, tmp_path: Path) -> None:
    server.truncate_first = 1
    granule = _granule(server)
    with requests.Session() as session:
        download_granules([granule], tmp_path, session=session, retries=2, backoff_s=0)
    assert _target(tmp_path).read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == "" and server.requests[1]["range"].startswith("bytes=")


def test_size_mismatch_after_retries_names_the_file(server: _Server, tmp_path: Path) -> None:
    granule = _granule(server, size=len(PAYLOAD) + 1234)
    with (
        requests.Session() as session,
        pytest.raises(GranuleError, match=f"could not download {re.escape(NAME)}"),
    ):
        download_granules([granule], tmp_path, session=session, retries=2, backoff_s=0)
    assert not _target(tmp_path).exists()
    assert len(server.requests) == 3


def test_unknown_size_uses_content_length(server: _Server, tmp_path: Path) -> None:
    granule = _granule(server, size=None)
    with requests.Session() as session:
        done = download_granules([granule], tmp_path, session=session, backoff_s=0)
    assert done[0].size == len(PAYLOAD)


def test_unauthorised_download_is_a_credentials_error(server: _Server, tmp_path: Path) -> None:
    server.status = 401
    granule = _granule(server)
    with requests.Session() as session, pytest.raises(CredentialsError, match="HTTP 401"):
        download_granules([granule], tmp_path, session=session, backoff_s=0)


def test_https_without_credentials_asks_for_them(fresh_earthaccess: None, tmp_path: Path) -> None:
    granule = Granule("M2T1NXSLV", date(2019, 1, 1), "400", NAME, f"https://data.example/{NAME}", 10)
    with pytest.raises(CredentialsError, match="EARTHDATA_TOKEN"):
        download_granules([granule], tmp_path)


def test_copy_from_a_local_path_or_fsspec_url(tmp_path: Path) -> None:
    source = _touch(tmp_path / "src", NAME, 5000)
    granule = Granule("M2T1NXSLV", date(2019, 1, 1), "400", NAME, f"file://{source}", 5000)
    done = download_granules([granule, replace(granule, url=str(source))], tmp_path / "cache")
    assert _target(tmp_path / "cache").read_bytes() == source.read_bytes()
    assert done[0].url == done[1].url == str(_target(tmp_path / "cache"))
