// Live time series of one node (uPlot): the last 15 minutes at 1 s resolution.
import uPlot from "./vendor/uplot-1.6.32/uPlot.esm.js";
import { bits, bytes, num, el } from "./format.js";

const MAX_POINTS = 900;
const CHARTS = [
  { title: "CPU and headroom", series: [["cpu", "CPU (of a core)", "#f0883e"], ["headroom", "headroom", "#3fb950"]], fmt: (v) => (v == null ? "" : Math.round(v * 100) + "%") },
  { title: "Packets/s", series: [["ingress_pps", "in", "#58a6ff"], ["egress_pps", "out", "#d2a8ff"]], fmt: (v) => num(v) },
  { title: "Bitrate", series: [["ingress_bps", "in", "#58a6ff"], ["egress_bps", "out", "#d2a8ff"]], fmt: bits },
  { title: "Rooms, participants, consumers", series: [["rooms", "rooms", "#e3b341"], ["participants", "participants", "#3fb950"], ["consumers", "consumers", "#d2a8ff"]], fmt: (v) => num(v) },
  { title: "Resident memory", series: [["rss", "RSS", "#8b949e"]], fmt: bytes },
];

export class NodeCharts {
  constructor(container) {
    this.container = container;
    this.plots = [];
    this.fields = [];
    this.data = null;
  }

  load(history) {
    this.fields = history.fields;
    const cols = history.fields.map((_, i) => history.samples.map((s) => s[i]));
    this.data = cols;
    this.container.replaceChildren();
    this.plots = CHARTS.map((spec) => {
      const box = el("div", { class: "chart" }, el("h3", {}, spec.title));
      this.container.append(box);
      const width = Math.max(260, Math.floor(this.container.clientWidth / 2) - 12);
      const opts = {
        width, height: 150, legend: { live: false },
        scales: { x: { time: true } },
        axes: [
          { stroke: "#8593a3", grid: { stroke: "#263140" }, ticks: { stroke: "#263140" } },
          { stroke: "#8593a3", grid: { stroke: "#263140" }, ticks: { stroke: "#263140" }, size: 64, values: (u, vals) => vals.map(spec.fmt) },
        ],
        series: [{}, ...spec.series.map(([, label, color]) => ({ label, stroke: color, width: 1.5, value: (u, v) => spec.fmt(v) }))],
      };
      return { spec, plot: new uPlot(opts, this.columns(spec), box) };
    });
  }

  columns(spec) {
    const idx = (name) => this.fields.indexOf(name);
    return [this.data[idx("time")], ...spec.series.map(([name]) => this.data[idx(name)])];
  }

  append(node, time) {
    if (!this.data || !node || !node.totals) return;
    const values = {
      time, cpu: node.cpu, headroom: node.headroom, rss: node.rss,
      ingress_pps: node.rates.ingress_pps, egress_pps: node.rates.egress_pps,
      ingress_bps: node.rates.ingress_bps, egress_bps: node.rates.egress_bps,
      rooms: node.totals.rooms, participants: node.totals.participants,
      producers: node.totals.producers, consumers: node.totals.consumers,
    };
    this.fields.forEach((f, i) => {
      this.data[i].push(values[f] ?? null);
      if (this.data[i].length > MAX_POINTS) this.data[i].shift();
    });
    for (const { spec, plot } of this.plots) plot.setData(this.columns(spec));
  }
}
