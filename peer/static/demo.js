// Cascade demo page: join a room, publish camera/mic, show every remote video.
import { Signaling } from "/static/signaling.js";

const $ = (id) => document.getElementById(id);
const state = {
  sig: null, pubPc: null, subPc: null, stream: null,
  tiles: new Map(), byMid: new Map(), names: new Map(),
};
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

function tile(consumer, stream) {
  let fig = state.tiles.get(consumer.consumer_id);
  if (!fig) {
    fig = document.createElement("figure");
    fig.dataset.consumerId = consumer.consumer_id;
    fig.dataset.kind = consumer.kind;
    const media = document.createElement(consumer.kind === "video" ? "video" : "audio");
    media.autoplay = true; media.playsInline = true; media.muted = consumer.kind === "video";
    fig.append(media);
    const cap = document.createElement("figcaption");
    cap.dataset.participantId = consumer.participant_id;
    cap.textContent = displayName(consumer.participant_id);
    fig.append(cap);
    if (consumer.kind === "video") $("grid").append(fig); else fig.hidden = true, document.body.append(fig);
    state.tiles.set(consumer.consumer_id, fig);
  }
  fig.querySelector("video,audio").srcObject = stream;
}

async function onOffer(msg) {
  if (!state.subPc) {
    state.subPc = new RTCPeerConnection({ iceServers: [] });
    state.subPc.ontrack = (e) => {
      const consumer = state.byMid.get(e.transceiver.mid);
      if (consumer) tile(consumer, new MediaStream([e.track]));
    };
  }
  for (const c of msg.consumers) state.byMid.set(c.mid, c);
  await state.subPc.setRemoteDescription({ type: "offer", sdp: msg.sdp });
  const answer = await state.subPc.createAnswer();
  await state.subPc.setLocalDescription(answer);
  state.sig.send({ type: "answer", sdp: state.subPc.localDescription.sdp });
}

function onEvent(msg) {
  switch (msg.type) {
    case "offer": onOffer(msg).catch((e) => setStatus(`negotiation failed: ${e}`)); break;
    case "consumer_closed": {
      state.tiles.get(msg.consumer_id)?.remove();
      state.tiles.delete(msg.consumer_id);
      break;
    }
    case "participant_joined":
      learnName(msg.participant);
      setStatus(`${msg.participant.name} joined`);
      break;
    case "participant_left":
      setStatus(`${displayName(msg.participant_id)} left`);
      break;
    case "error": setStatus(`error ${msg.code}: ${msg.message}`); break;
    case "closed": setStatus("disconnected"); break;
  }
}

async function join(ev) {
  ev.preventDefault();
  const room = $("room").value;
  const name = $("name").value || undefined;
  const tokenReply = await fetch(`/dev/token?room=${encodeURIComponent(room)}&identity=${encodeURIComponent(name || "guest")}`);
  if (!tokenReply.ok) { setStatus("this node does not hand out dev tokens"); return; }
  const { token } = await tokenReply.json();
  const region = $("region").value || undefined;
  const joined = await joinFollowingRedirects(room, token, name, region);
  for (const p of joined.participants) learnName(p);
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
    state.sig = new Signaling(wsUrlOf(base), onEvent);
    await state.sig.open();
    const reply = await state.sig.request({ type: "join", room, token, name, region, hops });
    if (reply.type !== "redirect") { state.node = base; return reply; }
    state.sig.onEvent = () => {};
    state.sig.close();
    const next = new URL(reply.url).origin;
    if (tried.has(next) || hops >= 2) throw new Error(`redirect loop at ${next}`);
    tried.add(next);
    base = next;
    setStatus(`placed on ${reply.region} node ${reply.node_id.slice(0, 8)} (${reply.reason})`);
  }
}

async function publish() {
  state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: true });
  state.pubPc = new RTCPeerConnection({ iceServers: [] });
  for (const track of state.stream.getTracks()) state.pubPc.addTransceiver(track, { direction: "sendonly" });
  const offer = await state.pubPc.createOffer();
  await state.pubPc.setLocalDescription(offer);
  await waitForIce(state.pubPc);
  const reply = await state.sig.request({ type: "publish", sdp: state.pubPc.localDescription.sdp });
  await state.pubPc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
  state.names.set("local", `${$("name").value || "you"} (you)`);
  tile({ consumer_id: "local", kind: "video", participant_id: "local" }, state.stream);
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
  try { await state.sig?.request({ type: "leave" }); } catch (_) { /* socket may be gone */ }
  state.sig?.close();
  state.pubPc?.close(); state.subPc?.close();
  state.stream?.getTracks().forEach((t) => t.stop());
  for (const fig of state.tiles.values()) fig.remove();
  Object.assign(state, { sig: null, pubPc: null, subPc: null, stream: null, published: undefined });
  state.tiles.clear(); state.byMid.clear(); state.names.clear();
  $("join-button").disabled = false; $("leave-button").disabled = true;
  setStatus("left");
}

$("join").addEventListener("submit", (ev) => join(ev).catch((e) => setStatus(`join failed: ${e}`)));
$("leave-button").addEventListener("click", () => leave());
