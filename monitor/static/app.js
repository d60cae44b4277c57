// Cascade overlay dashboard: live snapshots over Server-Sent Events, tables, graph, charts.
import { OverlayGraph } from "./graph.js";
import { NodeCharts } from "./charts.js";
import { bits, bytes, pct, num, el } from "./format.js";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const api = (path, query = {}) => {
  const q = new URLSearchParams(query);
  if (token) q.set("token", token);
  const s = q.toString();
  return "api/" + path + (s ? "?" + s : "");
};

const state = {
  snapshot: null,
  selected: params.get("node"),
  streams: { sort: "bitrate", order: "desc", offset: 0, limit: 50 },
};
const $ = (sel) => document.querySelector(sel);
const graph = new OverlayGraph($("#graph"), selectNode);
const charts = new NodeCharts($("#charts"));
window.cascadeDashboard = state;

function render(snap) {
  state.snapshot = snap;
  const up = snap.nodes.filter((n) => n.status === "up" || n.status === "draining").length;
  const participants = snap.rooms.reduce((a, r) => a + r.participants, 0);
  $("#summary").replaceChildren(
    el("span", {}, el("b", {}, up + "/" + snap.nodes.length), "nodes up"),
    el("span", {}, el("b", {}, snap.regions.length), "regions"),
    el("span", {}, el("b", {}, snap.rooms.length), "rooms"),
    el("span", {}, el("b", {}, participants), "participants"),
    el("span", {}, el("b", {}, snap.streams), "streams"),
  );
  renderAlerts(snap);
  renderNodes(snap);
  renderRegions(snap);
  renderLinks(snap);
  renderRooms(snap);
  renderFilterOptions(snap);
  graph.update(snap);
  if (!state.selected && snap.nodes.length) selectNode(snap.nodes[0].id);
  else if (state.selected) charts.append(snap.nodes.find((n) => n.id === state.selected), snap.time);
}

function renderAlerts(snap) {
  const items = snap.alerts.map((a) =>
    el("li", { class: a.severity, dataset: { kind: a.kind, node: a.node || "", region: a.region || "" } }, a.message));
  if (snap.directory_error) items.unshift(el("li", { class: "warning", dataset: { kind: "directory" } }, "directory: " + snap.directory_error));
  if (!items.length) items.push(el("li", { class: "none" }, "no alerts"));
  $("#alerts ul").replaceChildren(...items);
}

function renderNodes(snap) {
  const rows = snap.nodes.map((n) => {
    const t = n.totals || {}, r = n.rates || {};
    const tr = el("tr", { dataset: { nodeId: n.id, region: n.region, status: n.status }, class: n.id === state.selected ? "selected" : null, title: n.error || n.url },
      el("td", { class: "text" }, n.id.slice(0, 12)),
      el("td", { class: "text region" }, n.region),
      el("td", { class: "text" }, el("span", { class: "status " + n.status }, n.status)),
      el("td", {}, pct(n.cpu)),
      el("td", {}, pct(n.headroom)),
      el("td", {}, num(r.ingress_pps) + " / " + num(r.egress_pps)),
      el("td", {}, bits(r.ingress_bps) + " / " + bits(r.egress_bps)),
      el("td", {}, num(t.rooms)),
      el("td", {}, num(t.participants)),
      el("td", {}, num(t.consumers)),
      el("td", {}, bytes(n.rss)),
    );
    tr.addEventListener("click", () => selectNode(n.id));
    return tr;
  });
  $("#nodes tbody").replaceChildren(...rows);
}

function renderRegions(snap) {
  $("#regions tbody").replaceChildren(...snap.regions.map((r) =>
    el("tr", { dataset: { region: r.name } },
      el("td", { class: "text" }, r.name),
      el("td", {}, r.up + " / " + r.nodes),
      el("td", {}, pct(r.headroom)),
      el("td", {}, r.capacity == null ? "—" : num(r.used) + " / " + num(r.capacity)),
      el("td", {}, r.spilled == null ? "—" : num(r.spilled)),
      el("td", { class: "text" + (r.signal === "scale_out" ? " alert" : "") },
        r.signal ? r.signal.replace("_", "-") : el("span", { class: "muted" }, "n/a")))));
}

function nodeLabel(snap, id) {
  const n = snap.nodes.find((x) => x.id === id);
  return n ? id.slice(0, 8) + " (" + n.region + ")" : id.slice(0, 8);
}

function renderLinks(snap) {
  const rows = snap.edges.map((e) =>
    el("tr", { dataset: { source: e.source, target: e.target, state: e.state } },
      el("td", { class: "text" }, nodeLabel(snap, e.source)),
      el("td", { class: "text" }, nodeLabel(snap, e.target)),
      el("td", { class: "text" }, e.state),
      el("td", {}, num(e.flows)),
      el("td", {}, bits(e.bitrate)),
      el("td", {}, e.rtt == null ? "—" : (e.rtt * 1000).toFixed(1) + " ms")));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "text muted", colspan: 6 }, "no relay links")));
  $("#links tbody").replaceChildren(...rows);
}

function renderRooms(snap) {
  const rows = snap.rooms.map((r) =>
    el("tr", { dataset: { room: r.room } },
      el("td", { class: "text" }, r.room),
      el("td", { class: "participants" }, r.participants),
      el("td", {}, r.producers),
      el("td", { class: "text" }, ...Object.entries(r.nodes).map(([id, n]) =>
        el("span", { class: "chip", dataset: { node: id } }, nodeLabel(snap, id) + ": " + n)))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "text muted", colspan: 4 }, "no rooms")));
  $("#rooms tbody").replaceChildren(...rows);
}

function renderFilterOptions(snap) {
  const form = $("#stream-filters");
  const fill = (select, values, label) => {
    const current = select.value;
    const have = [...select.options].slice(1).map((o) => o.value).join("|");
    if (have === values.join("|")) return;
    select.replaceChildren(el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, label(v))));
    select.value = values.includes(current) ? current : "";
  };
  fill(form.room, snap.rooms.map((r) => r.room), (v) => v);
  fill(form.node, snap.nodes.map((n) => n.id), (v) => nodeLabel(snap, v));
}

async function selectNode(id) {
  state.selected = id;
  $("#chart-node").textContent = state.snapshot ? nodeLabel(state.snapshot, id) : id;
  graph.select(id);
  document.querySelectorAll("#nodes tbody tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.nodeId === id));
  try {
    const resp = await fetch(api("history", { node: id }));
    if (resp.ok && state.selected === id) charts.load(await resp.json());
  } catch (err) {
    console.warn("history", err);
  }
}

// -- streams table (server-side filter, sort and paging) ------------------------------
async function loadStreams() {
  const form = $("#stream-filters");
  const s = state.streams;
  const query = { sort: s.sort, order: s.order, offset: s.offset, limit: s.limit };
  for (const name of ["room", "node", "kind", "direction", "q"]) if (form[name].value) query[name] = form[name].value;
  let page;
  try {
    const resp = await fetch(api("streams", query));
    if (!resp.ok) return;
    page = await resp.json();
  } catch (err) {
    return;
  }
  const snap = state.snapshot;
  const rows = page.rows.map((r) =>
    el("tr", { dataset: { stream: r.id, room: r.room, node: r.node } },
      el("td", { class: "text", title: r.participant }, r.name),
      el("td", { class: "text" }, r.direction),
      el("td", { class: "text" }, r.kind),
      el("td", { class: "text" }, r.room),
      el("td", { class: "text" }, snap ? nodeLabel(snap, r.node) : r.node),
      el("td", {}, bits(r.bitrate)),
      el("td", {}, num(r.packets)),
      el("td", {}, num(r.packet_rate, 1)),
      el("td", {}, (r.fraction_lost * 100).toFixed(1) + " %"),
      el("td", {}, (r.jitter * 1000).toFixed(1) + " ms"),
      el("td", {}, num(r.nacks)),
      el("td", {}, num(r.plis)),
      el("td", {}, num(r.retransmits))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "text muted", colspan: 13 }, "no streams")));
  $("#streams tbody").replaceChildren(...rows);
  const last = Math.min(page.total, page.offset + page.rows.length);
  $("#page").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "";
  $("#stream-count").textContent = page.total + " matching";
  $("#prev").disabled = page.offset === 0;
  $("#next").disabled = last >= page.total;
}

document.querySelectorAll("#streams th[data-sort]").forEach((th) => {
  th.addEventListener("click", () => {
    const s = state.streams;
    s.order = s.sort === th.dataset.sort && s.order === "desc" ? "asc" : "desc";
    s.sort = th.dataset.sort;
    s.offset = 0;
    document.querySelectorAll("#streams th").forEach((h) => h.classList.remove("sorted", "asc"));
    th.classList.add("sorted");
    th.classList.toggle("asc", s.order === "asc");
    loadStreams();
  });
});
$("#streams th[data-sort=bitrate]").classList.add("sorted");
$("#stream-filters").addEventListener("input", () => { state.streams.offset = 0; loadStreams(); });
$("#stream-filters").addEventListener("submit", (e) => e.preventDefault());
$("#prev").addEventListener("click", () => { state.streams.offset = Math.max(0, state.streams.offset - state.streams.limit); loadStreams(); });
$("#next").addEventListener("click", () => { state.streams.offset += state.streams.limit; loadStreams(); });
setInterval(loadStreams, 2000);

// -- live updates -----------------------------------------------------------------------
function connect() {
  const live = $("#live");
  const source = new EventSource(api("events"));
  source.addEventListener("snapshot", (evt) => {
    live.dataset.state = "live";
    live.textContent = "live · " + new Date().toLocaleTimeString();
    try {
      render(JSON.parse(evt.data));
    } catch (err) {
      console.error("render failed", err);
    }
  });
  source.onerror = () => {
    live.dataset.state = "lost";
    live.textContent = "reconnecting…";
  };
}
connect();
loadStreams();
