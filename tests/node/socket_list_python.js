'use strict';
// Node's socket list against a Python child (tests/process/py_child.py):
//   node socket_list_python.js <python> <child.py>
// A Node net.Server passes the connections it accepts to the Python child. Node then asks the
// child about them: server.getConnections() (NODE_SOCKET_GET_COUNT -> NODE_SOCKET_COUNT) and
// server.close(cb) (NODE_SOCKET_NOTIFY_CLOSE -> NODE_SOCKET_ALL_CLOSED once the child has closed
// them). Without the child's answers both callbacks never run. Prints one JSON line and exits 0,
// or prints the failure on stderr and exits 1. A watchdog ends everything after 20 s.
const { fork } = require('child_process');
const net = require('net');
const assert = require('assert');

const [python, script] = process.argv.slice(2);
const child = fork(script, [], {
  execPath: python, execArgv: [], serialization: 'json',
  stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
});
const watchdog = setTimeout(() => fail('timed out'), 20000);
function fail(why) {
  process.stderr.write(`socket_list_python.js: ${why}\n`);
  child.kill('SIGKILL');
  process.exit(1);
}
child.on('error', (e) => fail(`child error: ${e}`));

const inbox = [];
let waiting = null;
child.on('message', (m) => {
  inbox.push(m);
  if (waiting) { const w = waiting; waiting = null; w(); }
});
function next() {
  return new Promise((resolve) => {
    const take = () => resolve(inbox.shift());
    if (inbox.length) take(); else waiting = take;
  });
}

async function main() {
  assert.deepStrictEqual(await next(), { ready: true });
  const result = { ok: false };
  const server = net.createServer({ pauseOnConnect: true }, (s) => child.send({ cmd: 'hold' }, s));
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;

  // Two clients; each connection is accepted by Node and handed to the Python child.
  const texts = [];
  for (let i = 1; i <= 2; i++) {
    const c = net.connect(port, '127.0.0.1');
    c.setEncoding('utf8');
    let text = '';
    c.on('data', (d) => { text += d; });
    texts.push(new Promise((resolve, reject) => {
      c.on('end', () => resolve(text));
      c.on('error', reject);
    }));
    assert.deepStrictEqual(await next(), { held: i });
  }

  // The server's own count is 0 (it gave the sockets away); the child holds both.
  result.connections = await new Promise((resolve, reject) =>
    server.getConnections((err, n) => (err ? reject(err) : resolve(n))));

  // close(cb) waits for the child: nothing may arrive before the child closes its copies.
  let closed = false;
  const closing = new Promise((resolve) => server.close(() => { closed = true; resolve(); }));
  child.send({ echo: 'ping' });
  assert.deepStrictEqual(await next(), { echo: 'ping' });
  result.closedWhileHeld = closed;

  child.send({ cmd: 'drop' });
  assert.deepStrictEqual(await next(), { dropped: 2 });
  await closing;
  result.closedAfterDrop = closed;
  result.clients = await Promise.all(texts);

  child.disconnect();
  const code = await new Promise((r) => child.on('exit', (c) => r(c)));
  result.exitCode = code;
  result.ok = true;
  return result;
}

main().then((result) => {
  clearTimeout(watchdog);
  process.stdout.write(JSON.stringify(result) + '\n');
}, (e) => fail(e && e.stack || e));
