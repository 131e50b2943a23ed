// A Node peer on a procwire Redis bus, using ioredis and the {event, data} JSON envelope.
// Usage: node bus_ioredis.js REDIS_URL CHANNEL
// Prints "ready" once subscribed, then: publishes node.hello; answers py.ping with node.pong;
// answers requests for "node.add" on its own channel CHANNEL:request:node.add:<id> (a
// requester finds it with PUBSUB CHANNELS CHANNEL:request:node.add:* and publishes each
// request to one responder), replying on reply_to;
// on py.ask, makes a request to the Python handler of "py.mul" the way any peer does (PUBSUB
// CHANNELS CHANNEL:request:py.mul:* lists the responders, PUBLISH to one, reply on its own
// reply channel) and publishes the answer as node.answer;
// exits on py.quit (and after 20 s in any case, so a failed test never leaves it running).
"use strict";
const { Redis } = require("ioredis");

const [url, channel] = process.argv.slice(2);
const sub = new Redis(url, { lazyConnect: false });
const pub = new Redis(url);
const requests = `${channel}:request:node.add:node${process.pid}`;
const publish = (event, data) => pub.publish(channel, JSON.stringify({ event, data }));
const quit = (code) => {
  sub.disconnect();
  pub.disconnect();
  process.exit(code);
};
setTimeout(() => quit(3), 20000).unref();

const replyTo = `${channel}:reply:node${process.pid}`;
const ask = async (name, data) => {
  const prefix = `${channel}:request:${name}:`;
  const found = await pub.pubsub("CHANNELS", prefix.replace(/[*?[\]\\]/g, "\\$&") + "*");
  const responders = found.filter((c) => !c.slice(prefix.length).includes(":"));
  for (const target of responders) {
    const id = `${replyTo}.${Date.now()}`;
    if ((await pub.publish(target, JSON.stringify({ id, reply_to: replyTo, data }))) > 0) return id;
  }
  return null; // no responder
};

sub.on("message", (ch, text) => {
  if (ch === replyTo) {
    const rep = JSON.parse(text);
    publish("node.answer", rep.error ? { error: rep.error } : { result: rep.data });
    return;
  }
  if (ch === requests) {
    const req = JSON.parse(text);
    const reply = typeof req.data.x === "number"
      ? { id: req.id, data: req.data.x + req.data.y }
      : { id: req.id, error: { type: "TypeError", message: "x must be a number" } };
    pub.publish(req.reply_to, JSON.stringify(reply));
    return;
  }
  let msg;
  try {
    msg = JSON.parse(text);
  } catch (e) {
    return; // not ours
  }
  if (msg.event === "py.ping") publish("node.pong", { got: msg.data });
  else if (msg.event === "py.ask") {
    ask(msg.data.name, msg.data.args).then((id) => {
      if (id === null) publish("node.answer", { error: { type: "NoResponder" } });
    });
  }
  else if (msg.event === "py.quit") setTimeout(() => quit(0), 50);
});

sub.subscribe(channel, requests, replyTo).then(async () => {
  await publish("node.hello", { from: "ioredis", n: [1, 2, 3] });
  process.stdout.write("ready\n");
});
