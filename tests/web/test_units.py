"""The dashboard's pure parts: URLs and their round trips, HTML escaping, the numbers behind the
charts, and the perfdb-web command line."""

from __future__ import annotations

import argparse
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from perfdb.config import Config as ServerConfig
from perfdb.config import ConfigError
from perfdb.config import build_parser as server_parser
from perfdb.web.analysis import (
    axis_scale,
    leaderboard,
    merge_aggregates,
    overview_histogram,
    ranked_users,
    sample_summary,
)
from perfdb.web.app import build_parser, config_from_args, main
from perfdb.web.assets import STATIC_DIR, accepts_gzip, asset_urls, build_bundles
from perfdb.web.markup import Markup, render
from perfdb.web.pages import MAIN_MAX_WIDTH_PX, MAIN_PADDING_PX, flatten
from perfdb.web.queries import (
    MICROS_PER_DAY,
    OPTIONAL_COLUMNS,
    OverviewView,
    QueryError,
    TableView,
    UserView,
    parse_moment,
    quick_range,
)
from tests.support import DASHBOARD, REPO_ROOT, Spawn


def _params(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


# -- URLs --------------------------------------------------------------------------------------


def test_table_view_round_trips_through_its_url() -> None:
    trail = ("0661660d462d38000000:-9120", "0661660d4790e2000000:-1.5e+20", "0661660d4790e2000001:")
    view = TableView.from_params(
        {"test": "unary", "q": "ada", "from": "2026-01-01", "sort": "perc_lat_99", "order": "desc",
         "cols": "qps,perc_lat_99", "per_page": "100", "trail": ",".join(trail)}
    )  # fmt: skip
    assert TableView.from_params(_params(view.url())) == view
    assert view.descending and view.columns == ("qps", "perc_lat_99") and view.trail == trail
    assert view.page_number == 4
    last = TableView.from_params({"last": "1", "tag": "x"})
    assert last.last and TableView.from_params(_params(last.url())) == last
    # Defaults stay out of the URL; the first page of the default view is just "/".
    assert TableView().url() == "/"
    assert TableView.from_params({"sort": "qps"}).url() == "/?sort=qps"  # highest first is the default
    assert TableView.from_params({"sort": "perc_lat_99"}).descending is False  # lowest latency first
    # Sorting by time is paged by position, by a metric by cursors: each keeps only its own.
    assert "trail" not in _params(TableView.from_params({"trail": "0" * 20 + ":1"}).url())
    assert "before" not in _params(TableView.from_params({"sort": "qps", "before": "0" * 20}).url())
    for bad in ({"trail": "nope"}, {"trail": ",".join(["0" * 20 + ":1"] * 100)}, {"last": "1", "before": "0" * 20}):
        with pytest.raises(QueryError):
            TableView.from_params(bad)


def test_a_header_click_sorts_then_flips() -> None:
    view = TableView.from_params({"before": "0661660d462d38000000"})
    by_qps = view.sorted_by("qps")
    assert (by_qps.sort, by_qps.descending, by_qps.before) == ("qps", True, None)
    assert by_qps.sorted_by("qps").descending is False
    assert view.sorted_by("time").descending is False  # time is already newest first
    with pytest.raises(QueryError, match="sort: must be one of time, qps"):
        TableView.from_params({"sort": "test"})  # perfdb ranks by time or a metric only


def test_dates_are_whole_utc_days_or_rfc3339_times() -> None:
    day = parse_moment("2026-01-31", "from", end_of_day=False)
    assert day % MICROS_PER_DAY == 0
    assert parse_moment("2026-01-31", "to", end_of_day=True) == day + MICROS_PER_DAY
    assert parse_moment("2026-01-31T12:00:00+01:00", "from", end_of_day=False) == day + 11 * 3600 * 1_000_000
    for bad in ("2026-1-31", "31/01/2026", "2026-01-31T12:00", "1969-12-31"):
        with pytest.raises(QueryError):
            parse_moment(bad, "from", end_of_day=False)
    date_from, date_to = quick_range(7, today_micros=day + 5)
    assert (date_from, date_to) == ("2026-01-25", "2026-01-31")


def test_user_and_overview_views() -> None:
    user = UserView.from_params("static:ci/bot", {"test": "unary", "user": "ignored", "q": "ignored"})
    assert user.path == "/users/static%3Aci%2Fbot"
    assert user.url() == "/users/static%3Aci%2Fbot?test=unary"
    assert user.api_url(600) == "/api/users/static%3Aci%2Fbot/series?test=unary&points=600"
    with pytest.raises(QueryError):
        UserView.from_params("bad\nid", {})
    assert OverviewView.from_params({}) == OverviewView("qps", "")
    everything = OverviewView.from_params({"metric": "perc_lat_99", "test": ""})
    assert OverviewView.from_params(_params(everything.url())) == everything
    assert _params(everything.url()) == {"metric": "perc_lat_99", "test": ""}


def test_columns_list_and_defaults() -> None:
    assert TableView.from_params({}).visible_columns[:4] == ["time", "user", "test", "tag"]
    assert TableView.from_params({"cols": ""}).visible_columns == ["time", "test"]
    assert TableView.from_params({"cols": ",".join(OPTIONAL_COLUMNS)}).url() == "/"


# -- HTML ---------------------------------------------------------------------------------------


def test_templates_escape_every_value_that_is_not_markup() -> None:
    html = render('<a title="{title}">{body}</a>', title='"><script>', body=Markup("<b>ok</b>"))
    assert html == '<a title="&quot;&gt;&lt;script&gt;"><b>ok</b></a>'


def test_nested_configuration_flattens_to_paths() -> None:
    config = {"a": {"b": [1, 2], "c": [{"d": None}], "e": {}}, "f": True, "g": "x"}
    assert flatten(config) == [("a.b", "1, 2"), ("a.c[0].d", None), ("a.e", "{}"), ("f", True), ("g", "x")]


# -- numbers behind the pages ---------------------------------------------------------------------


def _aggregate(values: dict[str, list[float]]) -> dict[str, Any]:
    """A test's aggregates as perfdb's overview op reports them (section 3.10), from user -> values."""
    every = [value for user_values in values.values() for value in user_values]
    buckets: dict[int, int] = {}
    for value in every:
        index = math.floor(math.log10(value) * 8)
        buckets[index] = buckets.get(index, 0) + 1
    return {
        "records": len(every) + 1,
        "count": len(every),
        "min": min(every),
        "max": max(every),
        "histogram": [[10 ** (k / 8), 10 ** ((k + 1) / 8), count] for k, count in sorted(buckets.items())],
        "users": {user: {"count": len(vs), "best": max(vs)} for user, vs in values.items()},
    }


def test_overview_histogram_spans_perfdbs_buckets_from_min_to_max() -> None:
    one = _aggregate({"ann": [10.0, 11.0, 100.0], "bob": [12.0]})
    histogram = overview_histogram(one, "qps")
    assert histogram["scale"] == "log" and histogram["count"] == 4
    # 10 to 100 is one decade: eight buckets, the empty ones between drawn as zero.
    assert [item["count"] for item in histogram["bins"]] == [3, 0, 0, 0, 0, 0, 0, 0, 1]
    assert (histogram["bins"][0]["low"], histogram["bins"][-1]["high"]) == (10.0, 100.0)
    assert histogram["bins"][1]["low"] == pytest.approx(10 ** (9 / 8))
    assert histogram["bins"][0]["label"] == "10.00 \u2013 13.34"
    # The first and last of perfdb's buckets are open-ended.
    open_ended = {"count": 2, "min": -5.0, "max": 2e12, "histogram": [[None, 0.001, 1], [1e12, None, 1]]}
    bins = overview_histogram(open_ended, "qps")["bins"]
    assert len(bins) == 122 and (bins[0]["low"], bins[-1]["high"]) == (-5.0, 2e12)
    assert overview_histogram(merge_aggregates([]), "qps") == {"scale": "log", "bins": [], "count": 0}


def test_all_tests_merge_counts_buckets_and_users() -> None:
    merged = merge_aggregates([_aggregate({"ann": [10.0, 20.0]}), _aggregate({"bob": [10.5], "ann": [1000.0]})])
    assert (merged["count"], merged["records"], merged["min"], merged["max"]) == (4, 6, 10.0, 1000.0)
    assert sorted(merged["users"]) == ["ann", "bob"]
    assert sum(count for _, _, count in merged["histogram"]) == 4
    assert merged["histogram"][0][2] == 2  # 10 and 10.5 share a bucket


def test_leaderboard_ranks_users_by_their_best_in_the_metrics_direction() -> None:
    users = {"ann": {"count": 3, "best": 300.0}, "bob": {"count": 1, "best": 200.0}, "cy": {"count": 2, "best": 300.0}}
    ranked = ranked_users({"users": users}, "higher")
    assert [user for user, _ in ranked] == ["ann", "cy", "bob"]  # a tie goes in user id order
    assert [user for user, _ in ranked_users({"users": users}, "lower")] == ["bob", "ann", "cy"]
    entries = leaderboard(ranked, {"ann": {"name": "Ann"}, "bob": None}, "perc_lat_99")
    assert [(entry.rank, entry.user_name, entry.text, entry.results) for entry in entries] == [
        (1, "Ann", "300 µs", 3),
        (2, "cy", "300 µs", 2),
        (3, "bob", "200 µs", 1),
    ]


def test_chart_axes_show_latencies_in_a_unit_that_suits_them() -> None:
    assert axis_scale("us", [900.0, 2500.0]) == {"label": "ms", "divisor": 1000}
    assert axis_scale("us", [90.0]) == {"label": "µs", "divisor": 1}
    assert axis_scale("qps", [250_000.0]) == {"label": "queries/s", "divisor": 1}


@pytest.mark.parametrize(
    ("unit", "values", "label", "divisor"),
    [
        # A record's ns in the millions is shown in ms; one scale for every value on the axis.
        ("ns", [900.0, 2_500_000.0], "ms", 1e6),
        ("ns", [126.6, 133.9], "ns", 1),
        ("ns", [0.4], "ns", 1),
        ("ns/op", [45_000.0], "µs/op", 1000),
        ("s", [2.08e-7, 2.7e-7], "ns", 1e-9),
        ("s", [0.02, 1.5], "s", 1),
        ("ps", [500.0], "ps", 1),
        ("ps", [3_000_000.0], "µs", 1e6),
        ("ops/s", [950.0], "ops/s", 1),
        ("ops/s", [2_500.0], "k ops/s", 1e3),
        ("ops/s", [3_400_000.0], "M ops/s", 1e6),
        ("ops/ms", [5.0], "k ops/s", 1),
        ("ops/us", [2.0], "M ops/s", 1),
        ("B", [512.0], "B", 1),
        ("B/op", [4096.0], "KiB/op", 1024),
        ("B/s", [11_032_809_135.1], "GiB/s", 1024**3),
        ("B/s", [3_000_000.0], "MiB/s", 1024**2),
        ("elem/s", [12_000.0], "k elem/s", 1e3),
        ("allocs/op", [7.0], "allocs/op", 1),
        ("percent", [55.0], "%", 1),
        ("1", [294_687.0], "", 1),
        ("", [], "", 1),
    ],
)
def test_chart_axes_scale_a_records_units(unit: str, values: list[float], label: str, divisor: float) -> None:
    scale = axis_scale(unit, values)
    assert scale["label"] == label
    assert scale["divisor"] == pytest.approx(divisor, rel=1e-12)


def test_asset_urls_change_with_the_content(tmp_path: Path) -> None:
    (tmp_path / "a.js").write_text("one")
    first = asset_urls(tmp_path)["a.js"]
    (tmp_path / "a.js").write_text("two")
    assert asset_urls(tmp_path)["a.js"] != first and first.startswith("/static/a.js?v=")


def test_bundle_urls_change_with_any_part(tmp_path: Path) -> None:
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            copy = tmp_path / path.relative_to(STATIC_DIR)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    before = build_bundles(tmp_path)
    (tmp_path / "charts.js").write_text("// another version\n")
    after = build_bundles(tmp_path)
    assert after["charts.js"].url != before["charts.js"].url and after["charts.js"].url.startswith("/static/bundle/")
    assert after["dashboard.js"].url == before["dashboard.js"].url  # not a part of it


def test_gzip_is_sent_to_a_client_that_accepts_it_by_name_or_star_and_not_at_q0() -> None:
    def accepts(header: str | None) -> bool:
        headers = {} if header is None else {"Accept-Encoding": header}
        return accepts_gzip(make_mocked_request("GET", "/", headers=headers))

    for taken in ("gzip", "gzip, deflate, br, zstd", "GZIP", "br;q=1, gzip;q=0.5", "*", "deflate, *;q=0.1"):
        assert accepts(taken), taken
    for refused in (None, "", "identity", "br, deflate", "gzip;q=0", "gzip; q=0.0", "*;q=0", "gzip;q=x", "x-gzip"):
        assert not accepts(refused), refused


def test_the_chart_pages_resolution_comes_from_mains_box_in_the_stylesheet() -> None:
    rule = re.search(r"^main \{([^}]*)\}", (STATIC_DIR / "dashboard.css").read_text(), re.M)
    assert rule is not None
    assert f"max-width: {MAIN_MAX_WIDTH_PX}px;" in rule.group(1)
    padding = re.search(r"padding: \d+px (\d+)px", rule.group(1))
    assert padding is not None and 2 * int(padding.group(1)) == MAIN_PADDING_PX


# -- the command line -----------------------------------------------------------------------------


def test_help_documents_every_option(spawn: Spawn) -> None:
    dashboard = spawn("--help", command=DASHBOARD, cwd=REPO_ROOT)
    code, stderr = dashboard.wait_exit(timeout=30)
    assert code == 0, stderr
    text = dashboard.stdout.decode()
    options = [action.option_strings[-1] for action in build_parser()._actions if action.option_strings]
    assert len(options) >= 10
    for option in options:
        assert option in text
    for documented in ("--server", "--listen", "--read-key-file", "--timeout", "--tls"):
        assert documented in options


def test_readme_lists_exactly_the_dashboards_options() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Dashboard\n") :]
    table = section[section.index("| option |") : section.index("\n\n", section.index("| option |"))]
    listed = {option for line in table.splitlines()[2:] for option in re.findall(r"`(--[a-z-]+)`", line.split("|")[1])}
    options = {action.option_strings[-1] for action in build_parser()._actions if action.option_strings}
    assert listed == options - {"--help", "--version"}


def test_settings_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERFDB_READ_KEY", raising=False)
    key_file = tmp_path / "read.key"
    key_file.write_text("  read-key-0123456789abcdef\n")
    config = config_from_args(["--server", "db:5000", "--listen", "0.0.0.0:9000", "--read-key-file", str(key_file)])
    assert (config.server, config.listen, config.read_key) == ("db:5000", "0.0.0.0:9000", "read-key-0123456789abcdef")
    assert config_from_args([]).read_key is None
    monkeypatch.setenv("PERFDB_READ_KEY", "from-the-environment")
    assert config_from_args([]).read_key == "from-the-environment"
    with pytest.raises(ConfigError, match="cannot read --read-key-file"):
        config_from_args(["--read-key-file", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="--listen"):
        config_from_args(["--listen", "nowhere"])


def test_dashboard_and_server_take_the_same_log_settings() -> None:
    def choices(parser: argparse.ArgumentParser, option: str) -> tuple[object, ...]:
        (action,) = [action for action in parser._actions if option in action.option_strings]
        assert action.choices is not None
        return tuple(action.choices)

    for option in ("--log-level", "--log-format"):
        assert choices(build_parser(), option) == choices(server_parser(), option), option
    defaults, server_defaults = config_from_args([]), ServerConfig()
    assert (defaults.log_level, defaults.log_format) == (server_defaults.log_level, server_defaults.log_format)


def test_bad_settings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.key").write_text("\n")
    assert main(["--read-key-file", str(tmp_path / "empty.key")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"perfdb-web: error: --read-key-file {tmp_path}/empty.key is empty"
    ]
    assert main(["--server", "no-port"]) == 2
    assert "--server must be hostname:port" in capsys.readouterr().err


def test_large_counts_are_grouped_never_in_exponent_form() -> None:
    from perfdb.records.units import format_value

    assert format_value(1_403_434, "") == "1,403,434"
    assert format_value(1_403_434.0, "") == "1,403,434"
    assert format_value(1234.5, "") == "1,234.50"
    assert format_value(250_000.7, "") == "250,001"
    assert format_value(42.0, "") == "42"
    assert format_value(0.125, "") == "0.125"


def test_values_are_shown_with_their_unit_scaled_to_suit_them() -> None:
    from perfdb.records.units import format_value

    assert format_value(1_234_567, "ns") == "1.23 ms"
    assert format_value(126.6, "ns") == "127 ns"
    assert format_value(2.0849e-7, "s") == "208 ns"
    assert format_value(11_032_809_135.1, "B/s") == "10.3 GiB/s"
    assert format_value(3_400_000, "ops/s") == "3.4 M ops/s"
    assert format_value(28_600, "us") == "28.6 ms"
    assert format_value(999.7, "ns") == "1,000 ns"  # rounded up, never 1e+03
    assert format_value(7200, "s") == "7,200 s"
    # Side by side in one scale: the largest value of the set picks it.
    assert format_value(900, "ns", peak=2_500_000) == "0.0009 ms"
    assert format_value(float("nan"), "ns") == "-" and format_value(True, "ns") == "-"


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([5.0], (1, 5.0, 5.0, 5.0, 5.0, 5.0)),
        ([4.0, 1.0, 3.0, 2.0], (4, 1.0, 1.5, 2.5, 3.5, 4.0)),  # even: medians of the halves
        ([3.0, 1.0, 2.0], (3, 1.0, 1.25, 2.0, 2.75, 3.0)),  # 4q + 3
        ([5.0, 4.0, 3.0, 2.0, 1.0], (5, 1.0, 1.75, 3.0, 4.25, 5.0)),  # 4q + 1
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], (7, 1.0, 2.25, 4.0, 5.75, 7.0)),
    ],
)
def test_sample_summary_has_the_five_numbers_and_the_count(samples: list[float], expected: tuple[float, ...]) -> None:
    summary = sample_summary(samples)
    assert (summary.count, summary.low, summary.first_quartile, summary.median, summary.third_quartile,
            summary.high) == pytest.approx(expected)  # fmt: skip


def test_sample_summary_matches_pytest_benchmarks_own_statistics() -> None:
    document = json.loads((REPO_ROOT / "tests/fixtures/tools/pytest-benchmark/parametrized.json").read_text())
    for bench in document["benchmarks"]:
        stats = bench["stats"]
        summary = sample_summary(stats["data"])
        assert summary.count == stats["rounds"]
        shown = [summary.low, summary.first_quartile, summary.median, summary.third_quartile, summary.high]
        expected = [stats["min"], stats["q1"], stats["median"], stats["q3"], stats["max"]]
        assert shown == pytest.approx(expected, rel=1e-12), bench["name"]
