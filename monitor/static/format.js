// Number formatting shared by the dashboard modules.
export function bits(v) {
  if (v == null) return "—";
  if (v >= 1e9) return (v / 1e9).toFixed(2) + " Gb/s";
  if (v >= 1e6) return (v / 1e6).toFixed(2) + " Mb/s";
  if (v >= 1e3) return (v / 1e3).toFixed(0) + " kb/s";
  return Math.round(v) + " b/s";
}
export function bytes(v) {
  if (v == null) return "—";
  if (v >= 1 << 30) return (v / (1 << 30)).toFixed(2) + " GiB";
  if (v >= 1 << 20) return (v / (1 << 20)).toFixed(0) + " MiB";
  return (v / 1024).toFixed(0) + " KiB";
}
export function pct(v) {
  return v == null ? "—" : Math.round(v * 100) + " %";
}
export function num(v, digits = 0) {
  return v == null ? "—" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });
}
export function headroomClass(h) {
  if (h == null) return "missing";
  return h > 0.5 ? "ok" : h > 0.2 ? "mid" : "low";
}
// Builds an element: el("td", {class: "x"}, "text", child, ...)
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
