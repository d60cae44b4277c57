// The overlay graph: regions as compound nodes, Cascade nodes inside them, relay links as
// edges weighted by bitrate. Positions are computed here (no layout run on every update).
import cytoscape from "./vendor/cytoscape-3.34.4/cytoscape.esm.min.js";
import { bits, headroomClass } from "./format.js";

const COLORS = { ok: "#3fb950", mid: "#d29922", low: "#f85149", missing: "#6e7681", draining: "#58a6ff" };

export class OverlayGraph {
  constructor(container, onSelect) {
    this.cy = cytoscape({
      container,
      wheelSensitivity: 0.3,
      boxSelectionEnabled: false,
      style: [
        { selector: "node.region", style: {
          "background-color": "#121a23", "border-color": "#30404f", "border-width": 1,
          label: "data(label)", "text-valign": "top", "text-halign": "center", color: "#8593a3",
          "font-size": 14, "padding": 22, shape: "round-rectangle" } },
        { selector: "node.node", style: {
          "background-color": "data(color)", label: "data(label)", color: "#d8dee6",
          "font-size": 12, "text-valign": "bottom", "text-margin-y": 4, width: 26, height: 26,
          "border-width": 2, "border-color": "#0b1015" } },
        { selector: "node.node.draining", style: { "border-color": COLORS.draining, "border-width": 4 } },
        { selector: "node.node.missing", style: { "border-style": "dashed", "border-color": "#f85149", opacity: 0.6 } },
        { selector: "node.node:selected", style: { "overlay-color": "#58a6ff", "overlay-opacity": 0.25 } },
        { selector: "edge", style: {
          width: "data(width)", "line-color": "#58a6ff", "target-arrow-color": "#58a6ff",
          "target-arrow-shape": "triangle", "curve-style": "bezier", label: "data(label)",
          "font-size": 11, color: "#c9d1d9", "text-background-color": "#0b1015",
          "text-background-opacity": 0.8, "text-background-padding": 2 } },
        { selector: "edge.down", style: { "line-color": "#f85149", "target-arrow-color": "#f85149", "line-style": "dashed" } },
      ],
      layout: { name: "preset" },
    });
    this.cy.on("tap", "node.node", (evt) => onSelect(evt.target.id()));
    this.layoutKey = "";
  }

  update(snapshot) {
    const cy = this.cy;
    const regions = [...new Set(snapshot.nodes.map((n) => n.region))].sort();
    const key = snapshot.nodes.map((n) => n.id).join(",");
    const positions = {};
    regions.forEach((r, i) => {
      const members = snapshot.nodes.filter((n) => n.region === r);
      const col = i % 3, row = Math.floor(i / 3);
      members.forEach((n, j) => {
        positions[n.id] = { x: col * 300 + (j % 3) * 80, y: row * 200 + Math.floor(j / 3) * 80 };
      });
    });
    cy.batch(() => {
      const want = new Set();
      for (const r of regions) {
        const id = "region:" + r;
        want.add(id);
        if (cy.getElementById(id).empty()) cy.add({ group: "nodes", data: { id, label: r }, classes: "region" });
      }
      for (const n of snapshot.nodes) {
        want.add(n.id);
        const cls = n.status === "missing" || n.status === "unreachable" ? "missing" : n.status === "draining" ? "draining" : headroomClass(n.headroom);
        const data = { id: n.id, parent: "region:" + n.region, label: n.id.slice(0, 8), color: COLORS[cls] };
        let ele = cy.getElementById(n.id);
        if (ele.empty()) ele = cy.add({ group: "nodes", data, position: positions[n.id] });
        else ele.data(data);
        ele.classes("node " + cls);
      }
      const known = new Set(snapshot.nodes.map((n) => n.id));
      for (const e of snapshot.edges) {
        if (!known.has(e.source) || !known.has(e.target)) continue;
        const id = "edge:" + e.source + ">" + e.target;
        want.add(id);
        const width = 1.5 + Math.min(8, Math.log10(1 + e.bitrate / 1e4) * 2.5);
        const data = { id, source: e.source, target: e.target, width, label: bits(e.bitrate) };
        let ele = cy.getElementById(id);
        if (ele.empty()) ele = cy.add({ group: "edges", data });
        else ele.data(data);
        ele.classes(e.state === "live" ? "" : "down");
      }
      cy.elements().forEach((ele) => { if (!want.has(ele.id())) cy.remove(ele); });
    });
    if (key !== this.layoutKey) {
      this.layoutKey = key;
      cy.nodes(".node").forEach((n) => n.position(positions[n.id()]));
      cy.fit(undefined, 40);
      if (cy.zoom() > 1.6) { cy.zoom(1.6); cy.center(); }
    }
  }

  select(id) {
    this.cy.$(":selected").unselect();
    this.cy.getElementById(id).select();
  }
}
