// Cascade demo page: join a room, publish camera/mic, show every remote video.
import { Signaling } from "/static/signaling.js";

const $ = (id) => document.getElementById(id);
const state = {
  sig: null, pubPc: null, subPc: null, stream: null,
  tiles: new Map(), byMid: new Map(), names: new Map(), consumers: new Map(),
  joinArgs: null, participantId: null, fallbacks: [], sources: new Map(), moves: [],
  resumed: new Set(),
  moving: false, leaving: false,
};
const OVERLAP_MS = 2000; // after a migrate, the old node keeps our media this long
const HOLD_MS = 15000; // a tile whose media stopped waits this long for its replacement
window.cascade = state; // exposed for tests and debugging

function setStatus(text) { $("status").textContent = text; }

function displayName(participantId) {
  return state.names.get(participantId) || participantId;
}

function learnName(participant) {
  if (!participant.name) return;
  state.names.set(participant.participant_id, participant.name);
  for (const cap of document.querySelectorAll("figcaption[data-participant-id]")) {
    if (cap.dataset.participantId === participant.participant_id) cap.textContent = participant.name;
  }
}

// One tile per published track (its source): a publisher or this page moving to another
// node keeps the tile, only its media is replaced.
function sourceOf(consumer) { return consumer.source || consumer.producer_id || consumer.consumer_id; }

function tile(consumer, stream) {
  const key = sourceOf(consumer);
  let fig = state.tiles.get(key);
  if (!fig) {
    fig = document.createElement("figure");
    fig.dataset.source = key;
    fig.dataset.kind = consumer.kind;
    const media = document.createElement(consumer.kind === "video" ? "video" : "audio");
    media.autoplay = true; media.playsInline = true; media.muted = consumer.kind === "video";
    fig.append(media);
    const cap = document.createElement("figcaption");
    cap.dataset.participantId = consumer.participant_id;
    cap.textContent = displayName(consumer.participant_id);
    fig.append(cap);
    if (consumer.kind === "video") $("grid").append(fig); else fig.hidden = true, document.body.append(fig);
    state.tiles.set(key, fig);
  }
  fig.dataset.consumerId = consumer.consumer_id;
  fig.classList.remove("held");
  clearTimeout(fig.holdTimer);
  fig.querySelector("video,audio").srcObject = stream;
}

function holdTile(key) {
  const fig = state.tiles.get(key);
  if (!fig || fig.classList.contains("held")) return;
  fig.classList.add("held");
  fig.holdTimer = setTimeout(() => { fig.remove(); state.tiles.delete(key); }, HOLD_MS);
}

async function onOffer(msg, sig) {
  if (sig !== state.sig) return; // from a node this page moved away from
  if (!state.subPc) {
    const pc = new RTCPeerConnection({ iceServers: [] });
    state.subPc = pc;
    pc.ontrack = (e) => {
      const consumer = state.byMid.get(e.transceiver.mid);
      if (!consumer) return;
      const stream = new MediaStream([e.track]);
      const fig = state.tiles.get(sourceOf(consumer));
      // A continued tile switches once the new media plays, so the old one shows until then.
      if (fig && fig.dataset.consumerId !== consumer.consumer_id && e.track.kind === "video") {
        const probe = document.createElement("video");
        probe.muted = true; probe.srcObject = stream;
        probe.onplaying = () => tile(consumer, stream);
        probe.play().catch(() => tile(consumer, stream));
        setTimeout(() => tile(consumer, stream), 3000);
      } else {
        tile(consumer, stream);
      }
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed" && pc === state.subPc) connectionLost("media failed");
    };
  }
  for (const c of msg.consumers) { state.byMid.set(c.mid, c); state.consumers.set(c.consumer_id, c); }
  await state.subPc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
  const answer = await state.subPc.createAnswer();
  await state.subPc.setLocalDescription(answer);
  if (sig === state.sig) sig.send({ type: "answer", sdp: state.subPc.localDescription.sdp });
}

function onEvent(msg, sig) {
  if (sig !== state.sig) return; // a node this page moved away from
  switch (msg.type) {
    case "offer": onOffer(msg, sig).catch((e) => setStatus(`negotiation failed: ${e}`)); break;
    case "consumer_closed": {
      const consumer = state.consumers.get(msg.consumer_id);
      state.consumers.delete(msg.consumer_id);
      const key = consumer ? sourceOf(consumer) : null;
      if (!key || state.tiles.get(key)?.dataset.consumerId !== msg.consumer_id) break;
      if (msg.reason === "migrating" || msg.reason === "origin_lost") { holdTile(key); break; }
      state.tiles.get(key)?.remove();
      state.tiles.delete(key);
      break;
    }
    case "consumer_switched": {
      const consumer = state.consumers.get(msg.consumer_id);
      if (consumer) consumer.producer_id = msg.producer_id;
      break;
    }
    case "migrate":
      move(msg.url, "migrate").catch((e) => setStatus(`moving failed: ${e}`));
      break;
    case "reconnect": // the node's worker process died: rejoin the same node
      move(msg.url, "reconnect").catch((e) => setStatus(`reconnecting failed: ${e}`));
      break;
    case "participant_joined":
      learnName(msg.participant);
      if (msg.participant.resumes) state.resumed.add(msg.participant.resumes);
      else setStatus(`${msg.participant.name} joined`);
      break;
    case "participant_left":
      // A participant that moved to another node (drain, failover) did not leave.
      if (msg.reason === "migrated" || state.resumed.has(msg.participant_id)) break;
      setStatus(`${displayName(msg.participant_id)} left`);
      break;
    case "error": setStatus(`error ${msg.code}: ${msg.message}`); break;
    case "closed": connectionLost("signaling closed"); break;
  }
}

// -- moving between nodes: migrate (the node drains) and failover (the node died) --------

function connectionLost(why) {
  if (state.leaving || state.moving || !state.joinArgs) { setStatus("disconnected"); return; }
  setStatus(`connection lost (${why}): reconnecting`);
  move(null, "failover").catch((e) => setStatus(`reconnecting failed: ${e}`));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function move(url, reason) {
  if (state.moving) return;
  state.moving = true;
  const started = performance.now();
  const old = { sig: state.sig, pubPc: state.pubPc, subPc: state.subPc, node: state.node };
  const previous = state.participantId;
  state.sig = null; state.pubPc = null; state.subPc = null; state.byMid = new Map();
  if (reason !== "migrate") for (const key of state.tiles.keys()) if (key !== "local") holdTile(key);
  try {
    for (let attempt = 0; ; attempt++) {
      const targets = url ? [url] : state.fallbacks.map((f) => f.url);
      if (!targets.length) targets.push(old.node);
      const target = new URL(targets[attempt % targets.length]).origin;
      if (reason === "failover" || attempt) await sleep(Math.random() * Math.min(5000, 250 * 2 ** attempt));
      try {
        await rejoin(target, previous);
        break;
      } catch (e) {
        setStatus(`rejoining through ${target} failed (${e}); retrying`);
        state.sig?.close(); state.pubPc?.close(); state.subPc?.close();
        state.sig = null; state.pubPc = null; state.subPc = null;
        if (url && attempt >= 2) url = null;
      }
    }
    if (reason === "migrate" && old.pubPc) await sleep(OVERLAP_MS);
    state.moves.push({ reason, from: old.node, to: state.node, ms: Math.round(performance.now() - started) });
    setStatus(`moved to ${state.node} (${reason})`);
  } finally {
    state.moving = false;
    try { old.sig?.send({ type: "leave" }); } catch (_) { /* gone */ }
    old.sig?.close(); old.pubPc?.close(); old.subPc?.close();
  }
}

async function rejoin(base, previous) {
  const { room, token, name, region } = state.joinArgs;
  const sig = new Signaling(wsUrlOf(base), (m) => onEvent(m, sig));
  state.sig = sig;
  await sig.open();
  const reply = await sig.request({ type: "join", room, token, name, region, hops: 2, resumes: previous || undefined });
  if (reply.type === "redirect") throw new Error(`redirected to ${reply.url}`);
  joinedHere(reply, base);
  if (state.stream) await publish();
}

function joinedHere(reply, base) {
  state.node = base;
  state.participantId = reply.participant_id;
  state.fallbacks = reply.fallbacks || [];
  for (const p of reply.participants) learnName(p);
}

async function join(ev) {
  ev.preventDefault();
  const room = $("room").value;
  const name = $("name").value || undefined;
  const tokenReply = await fetch(`/dev/token?room=${encodeURIComponent(room)}&identity=${encodeURIComponent(name || "guest")}`);
  if (!tokenReply.ok) { setStatus("this node does not hand out dev tokens"); return; }
  const { token } = await tokenReply.json();
  const region = $("region").value || undefined;
  state.joinArgs = { room, token, name, region };
  state.leaving = false;
  const joined = await joinFollowingRedirects(room, token, name, region);
  joinedHere(joined, state.node);
  const where = state.node === location.origin ? "this node" : `${state.node} (placed there)`;
  setStatus(`joined ${room} as ${name || joined.identity} on ${where}`);
  $("join-button").disabled = true; $("leave-button").disabled = false;
  if ($("publish").checked) await publish();
}

function wsUrlOf(httpUrl) {
  const url = new URL("/ws", httpUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// Join through this node; placement may redirect to another node (at most two hops).
async function joinFollowingRedirects(room, token, name, region) {
  const tried = new Set([location.origin]);
  let base = location.origin;
  for (let hops = 0; ; hops++) {
    const sig = new Signaling(wsUrlOf(base), (m) => onEvent(m, sig));
    state.sig = sig;
    await sig.open();
    const reply = await sig.request({ type: "join", room, token, name, region, hops });
    if (reply.type !== "redirect") { state.node = base; return reply; }
    state.sig = null;
    sig.close();
    const next = new URL(reply.url).origin;
    if (tried.has(next) || hops >= 2) throw new Error(`redirect loop at ${next}`);
    tried.add(next);
    base = next;
    setStatus(`placed on ${reply.region} node ${reply.node_id.slice(0, 8)} (${reply.reason})`);
  }
}

async function publish() {
  // The same camera tracks are republished after a move, continuing their sources.
  state.stream ??= await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: true });
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pubPc = pc;
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed" && pc === state.pubPc) connectionLost("media failed");
  };
  const transceivers = state.stream.getTracks().map((track) => [track, pc.addTransceiver(track, { direction: "sendonly" })]);
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  await waitForIce(pc);
  const sources = {};
  for (const [track, t] of transceivers) if (state.sources.has(track.id)) sources[t.mid] = state.sources.get(track.id);
  const reply = await state.sig.request({ type: "publish", sdp: pc.localDescription.sdp, sources });
  await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
  for (const [track, t] of transceivers) {
    const producer = reply.producers.find((p) => p.mid === t.mid);
    if (producer && !state.sources.has(track.id)) state.sources.set(track.id, producer.source);
  }
  state.names.set("local", `${$("name").value || "you"} (you)`);
  tile({ consumer_id: "local", source: "local", kind: "video", participant_id: "local" }, state.stream);
  state.published = reply.producers;
}

function waitForIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 3000);
  });
}

async function leave() {
  state.leaving = true;
  try { await state.sig?.request({ type: "leave" }); } catch (_) { /* socket may be gone */ }
  state.sig?.close();
  state.pubPc?.close(); state.subPc?.close();
  state.stream?.getTracks().forEach((t) => t.stop());
  for (const fig of state.tiles.values()) fig.remove();
  Object.assign(state, { sig: null, pubPc: null, subPc: null, stream: null, published: undefined, joinArgs: null });
  state.tiles.clear(); state.byMid.clear(); state.names.clear(); state.consumers.clear(); state.sources.clear();
  $("join-button").disabled = false; $("leave-button").disabled = true;
  setStatus("left");
}

$("join").addEventListener("submit", (ev) => join(ev).catch((e) => setStatus(`join failed: ${e}`)));
$("leave-button").addEventListener("click", () => leave());
