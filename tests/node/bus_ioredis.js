// A Node peer on a procwire Redis bus, using ioredis and the {event, data} JSON envelope.
// Usage: node bus_ioredis.js REDIS_URL CHANNEL
// Prints "ready" once subscribed, then: publishes node.hello; answers py.ping with node.pong;
// answers requests for "node.add" on its own channel CHANNEL:request:node.add:<id> (a
// requester finds it with PUBSUB CHANNELS CHANNEL:request:node.add:* and publishes each
// request to one responder), replying on reply_to;
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

sub.on("message", (ch, text) => {
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
  else if (msg.event === "py.quit") setTimeout(() => quit(0), 50);
});

sub.subscribe(channel, requests).then(async () => {
  await publish("node.hello", { from: "ioredis", n: [1, 2, 3] });
  process.stdout.write("ready\n");
});
