'use strict';
// Node parent forking a Python child (tests/process/py_child.py) with child_process.fork():
//   node fork_python.js <python> <child.py>
// Prints one JSON line {ok: true, ...} on stdout and exits 0, or prints the failure on stderr
// and exits 1. A watchdog ends everything after 20 s.
const { fork } = require('child_process');
const net = require('net');
const assert = require('assert');

const [python, script] = process.argv.slice(2);
const child = fork(script, [], {
  execPath: python,
  execArgv: [],
  serialization: 'json',
  stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
});
const watchdog = setTimeout(() => fail('timed out'), 20000);
const result = { ok: false };

function fail(why) {
  process.stderr.write(`fork_python.js: ${why}\n`);
  child.kill('SIGKILL');
  process.exit(1);
}
child.on('error', (e) => fail(`child error: ${e}`));

// Messages from the child arrive here, one by one, in order.
const inbox = [];
let waiting = null;
child.on('message', (m, handle) => {
  inbox.push({ m, handle });
  if (waiting) { const w = waiting; waiting = null; w(); }
});
function next() {
  return new Promise((resolve) => {
    const take = () => resolve(inbox.shift());
    if (inbox.length) take(); else waiting = take;
  });
}
function readAll(sock) {
  return new Promise((resolve, reject) => {
    let data = '';
    sock.setEncoding('utf8');
    sock.on('data', (d) => { data += d; });
    sock.on('end', () => resolve(data));
    sock.on('error', reject);
  });
}

async function main() {
  const ready = await next();
  assert.deepStrictEqual(ready.m, { ready: true });

  // 1. Echo: unicode, raw newlines in strings, U+2028/U+2029, and 1 MiB.
  const cases = [
    { text: 'héllo wörld ☃ 日本語 😀' },
    'line1\nline2\r\n',
    '\u2028\u2029',
    ['nested', { deep: [1, 2.5, null, true, false, -0.125] }],
    42,
    'x'.repeat(1024 * 1024),
  ];
  for (const c of cases) {
    child.send({ echo: c });
    const got = await next();
    assert.deepStrictEqual(got.m, { echo: c });
  }
  result.echoed = cases.length;

  // 2. Node -> Python handle: a listening server; the message after it is queued by Node until
  //    the Python side answers NODE_HANDLE_ACK.
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  child.send({ cmd: 'serve', port }, server);
  child.send({ echo: 'after-handle' });
  server.close(); // our copy: from now on only the child accepts
  const reply = await new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', reject);
    readAll(s).then(resolve, reject);
  });
  assert.ok(reply.startsWith('hello from python'), reply);
  const served = await next();
  assert.deepStrictEqual(served.m, { served: port });
  const after = await next();
  assert.deepStrictEqual(after.m, { echo: 'after-handle' });
  result.nodeToPython = reply;

  // 3. Python -> Node handle: the child sends a listening TCP socket; it arrives as net.Server.
  child.send({ cmd: 'give' });
  const gift = await next();
  assert.ok(gift.handle instanceof net.Server, `handle is ${gift.handle}`);
  gift.handle.once('connection', (s) => { s.end('hello from node'); gift.handle.close(); });
  const text = await new Promise((resolve, reject) => {
    const s = net.connect(gift.m.port, '127.0.0.1');
    s.on('error', reject);
    readAll(s).then(resolve, reject);
  });
  assert.strictEqual(text, 'hello from node');
  const report = await next();
  assert.deepStrictEqual(report.m, { gave: gift.m.port });
  result.pythonToNode = text;

  // 4. NaN is refused by the Python side (it reports the error instead of sending garbage).
  child.send({ cmd: 'nan' });
  const nan = await next();
  assert.strictEqual(nan.m.refused, 'EncodeError');

  // 5. Disconnect: the child's channel ends, it leaves its loop and exits 0.
  child.disconnect();
  const [code, signal] = await new Promise((r) => child.on('exit', (c, s) => r([c, s])));
  assert.strictEqual(code, 0, `exit code ${code} signal ${signal}`);
  result.exitCode = code;
  result.ok = true;
}

main().then(() => {
  clearTimeout(watchdog);
  process.stdout.write(JSON.stringify(result) + '\n');
}, (e) => fail(e && e.stack || e));
