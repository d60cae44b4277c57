"""Sans-I/O load-test logic: slots, track meters, the report, the capacity search."""

from __future__ import annotations

import pytest

from loadtests.participant import ssrcs_by_mid
from loadtests.scenario import (
    CapacitySearch,
    ParticipantRecord,
    QualityTarget,
    QualityWindow,
    Scenario,
    ServerSeries,
    TrackMeter,
    build_report,
    format_report,
    percentile,
)


def test_rooms_fill_publishers_first():
    sc = Scenario(room_size=3, publisher_share=0.34)
    slots = [sc.slot(i, "http://n") for i in range(6)]
    assert [s.room for s in slots] == ["load-w0-r0"] * 3 + ["load-w0-r1"] * 3
    assert [s.publishes for s in slots] == [True, False, False] * 2
    assert slots[4].identity == "load-w0-r1-p1" and slots[4].node == "http://n"


def test_round_robin_rooms_and_nodes_spread_per_participant():
    sc = Scenario(
        rooms=2, nodes=("http://a/", "http://b"), spread="participant", regions=("eu", "us")
    )
    slots = [sc.slot(i, "") for i in range(4)]
    assert [s.room[-2:] for s in slots] == ["r0", "r1", "r0", "r1"]
    assert [(s.node, s.region) for s in slots] == [
        ("http://a", "eu"), ("http://a", "eu"), ("http://b", "us"), ("http://b", "us"),
    ]  # fmt: skip


def test_audio_only_share_spreads_over_publishers():
    sc = Scenario(room_size=4, audio_only_share=0.5)
    assert [sc.slot(i, "h").audio_only for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("bad", [{"room_size": 0}, {"codec": "av1"}, {"publisher_share": 2}])
def test_bad_scenarios_are_refused(bad):
    with pytest.raises(ValueError):
        Scenario(**bad)


def test_track_meter_windows_first_frame_and_freezes():
    m = TrackMeter("video", started=10.0)
    m.observe(10.1, 0, 0, 0, 0)
    m.observe(10.5, 3, 10, 1000, 0)  # first frame after 0.5 s
    assert m.first_frame_seconds == pytest.approx(0.5)
    m.observe(11.5, 33, 100, 126000, 2)
    w = m.window()
    assert w.fps == pytest.approx(30.0) and w.kbps == pytest.approx(1000.0)
    assert w.loss == pytest.approx(2 / 92)
    m.observe(12.0, 33, 100, 126000, 2)
    m.observe(12.2, 33, 100, 126000, 2)  # 0.7 s without a frame: a freeze
    assert m.freezes == 1
    m.observe(12.4, 40, 120, 130000, 2)
    w = m.window()
    assert w.freezes == 1 and w.freeze_ms == (pytest.approx(900.0),)
    record = m.record("r", "p")
    assert record.first_frame_ms == 500.0 and record.frames == 40


def test_report_counts_tracks_against_what_the_room_published():
    def rec(identity: str, published: int, received: int) -> ParticipantRecord:
        tracks = [TrackMeter("video", 0.0).record("r", identity) for _ in range(received)]
        for t in tracks:
            t.frames, t.packets, t.bytes, t.seconds, t.first_frame_ms = 30, 90, 62500, 1.0, 300.0
        return ParticipantRecord("r", identity, published, errors={}, tracks=tracks)

    records = [rec("a", 2, 2), rec("b", 2, 2), rec("c", 0, 3)]
    records[2].errors = {"overloaded": 1}
    report = build_report(records, server=ServerSeries().summary())
    total = report["total"]
    assert (total["tracks_received"], total["tracks_expected"]) == (7, 8)
    assert total["mean_kbps"] == 500.0 and total["errors"] == {"overloaded": 1}
    assert ParticipantRecord.from_dict(records[2].to_dict()) == records[2]
    table = format_report(report)
    assert "7/8" in table and "overloaded:1" in table


def test_server_series_sums_nodes():
    s = ServerSeries()
    for t, cpu in ((1.0, 0.2), (2.0, 0.4)):
        s.add("a", t, {"cpu": cpu, "totals": {"egress_packet_rate": 1000, "consumers": 4}})
        s.add("b", t, {"cpu": 0.1, "totals": {"egress_packet_rate": 500, "consumers": 2}})
    summary = s.summary()
    assert summary["nodes"]["a"]["cpu_mean"] == pytest.approx(0.3)
    assert summary["cpu_mean"] == pytest.approx(0.4) and summary["egress_pps_mean"] == 1500


def test_quality_window_breaches():
    target = QualityTarget()
    assert (
        QualityWindow(first_frame_ms=[300.0], video_fps=[30.0], packets=1000).breaches(target) == []
    )
    broken = QualityWindow(
        first_frame_ms=[1500.0], video_fps=[20.0], packets=90, lost=10, refusals=1
    )
    assert len(broken.breaches(target)) == 4
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([], 0.5) is None
    assert QualityWindow().breaches(target) == ["no media received"]


def test_capacity_search_stops_at_the_first_broken_step():
    search = CapacitySearch(step_users=5, step_seconds=10, max_users=100)
    assert search.tick(0.0, {}, {}) == 5
    good = {"first_frame_ms": [200.0], "video_fps": [30.0], "packets": 1000}
    search.add(6.0, good)
    assert search.tick(5.0, {}, {}) == 5
    assert search.tick(10.0, {"cpu_mean": 0.3}, {}) == 10
    search.add(16.0, {"video_fps": [12.0], "packets": 1000})
    assert search.tick(20.0, {"cpu_mean": 0.9}, {}) is None
    result = search.result()
    assert result["last_held"]["users"] == 5 and result["last_held"]["server"] == {"cpu_mean": 0.3}
    assert result["broke"]["users"] == 10 and "video fps" in result["broke"]["breaches"][0]


def test_ssrcs_by_mid_prefers_the_fid_media_ssrc():
    sdp = "\r\n".join([
        "v=0", "m=video 9 UDP/TLS/RTP/SAVPF 97 98", "a=mid:0",
        "a=ssrc-group:FID 111 222", "a=ssrc:111 cname:x", "a=ssrc:222 cname:x",
        "m=audio 9 UDP/TLS/RTP/SAVPF 96", "a=mid:1", "a=ssrc:333 cname:x",
    ])  # fmt: skip
    assert ssrcs_by_mid(sdp) == {"0": 111, "1": 333}


def test_total_counts_each_room_on_its_own():
    records = [
        ParticipantRecord(room, f"{room}-{i}", 2 if i == 0 else 0)
        for room in ("r0", "r1")
        for i in range(3)
    ]
    report = build_report(records)
    assert report["rooms"]["r0"]["tracks_expected"] == 4
    assert report["total"]["tracks_expected"] == 8


def test_capacity_search_retries_a_broken_step_before_stopping():
    search = CapacitySearch(step_users=5, step_seconds=10, max_users=100, retries=1)
    search.tick(0.0, {}, {})
    search.add(6.0, {"video_fps": [10.0]})
    assert search.tick(10.0, {}, {}) == 5  # broke once: same load again
    search.add(16.0, {"video_fps": [30.0]})
    assert search.tick(20.0, {}, {}) == 10
    search.add(26.0, {"video_fps": [10.0]})
    assert search.tick(30.0, {}, {}) == 10
    search.add(36.0, {"video_fps": [10.0]})
    assert search.tick(40.0, {}, {}) is None
    result = search.result()
    assert result["last_held"]["users"] == 5 and result["broke"]["users"] == 10
