// Cascade signaling client: one WebSocket, request/reply by id, events to a callback.
export class Signaling {
  constructor(url, onEvent) {
    this.url = url;
    this.onEvent = onEvent;
    this.nextId = 1;
    this.pending = new Map();
  }

  open() {
    return new Promise((resolve, reject) => {
      this.ws = new WebSocket(this.url);
      this.ws.onopen = () => resolve();
      this.ws.onerror = (e) => reject(e);
      this.ws.onclose = () => this.onEvent({ type: "closed" });
      this.ws.onmessage = (e) => this.dispatch(JSON.parse(e.data));
      this.keepalive = setInterval(() => this.request({ type: "ping" }).catch(() => {}), 15000);
    });
  }

  dispatch(msg) {
    const waiter = this.pending.get(msg.id);
    if (waiter) {
      this.pending.delete(msg.id);
      if (msg.type === "error") waiter.reject(new Error(`${msg.code}: ${msg.message}`));
      else waiter.resolve(msg);
      return;
    }
    this.onEvent(msg);
  }

  request(msg) {
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ ...msg, id }));
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
  }

  send(msg) { this.ws.send(JSON.stringify(msg)); }

  close() { clearInterval(this.keepalive); this.ws?.close(); }
}
