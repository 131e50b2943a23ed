'use strict';
// Node side of procwire's channel benchmark: child_process.fork() IPC with the default
// json serialization, measured the way Node programs use it (process.send / on('message')).
//
//   node node_fork_bench.js tput <payload bytes> <max messages> <max seconds>
//   node node_fork_bench.js lat <payload bytes> <warm-up round trips> <max round trips> <max seconds>
//   node node_fork_bench.js dict <max messages> <max seconds>
//   node node_fork_bench.js dict_lat <warm-up round trips> <max round trips> <max seconds>
//
// Prints one JSON object on stdout. Throughput: {t0_ns, t_end_ns, sent, received, bytes}, where
// t_end_ns is taken by the child when it sees the end marker (both clocks are CLOCK_MONOTONIC).
// Latency: {n, p50_ns, p99_ns}. Exits non-zero with a message on stderr on any failure.

const { fork } = require('child_process');

// Node queues every send() that the socket does not take at once, without limit; counting the
// send callbacks keeps that queue bounded, as a real program would have to.
const MAX_INFLIGHT = 1000;
const MAX_INFLIGHT_BYTES = 8 * 1024 * 1024;
const END = { event: 'end' };
const SMALL_DICT = { event: 'task', data: { id: 123, name: 'doSomething' } };

const now = () => process.hrtime.bigint();

function runChild(role) {
  // The parent may die without saying goodbye; losing the channel must end the child.
  process.on('disconnect', () => process.exit(0));
  if (role === 'sink') {
    let count = 0;
    let bytes = 0;
    process.on('message', (m) => {
      if (m.event === 'task') {
        count++;
        if (typeof m.data === 'string') bytes += m.data.length;
        return;
      }
      const tEnd = now();
      process.send(
        { event: 'done', t_end_ns: tEnd.toString(), received: count, bytes },
        () => process.disconnect(),
      );
    });
  } else {
    process.on('message', (m) => {
      if (m.event === 'end') process.disconnect();
      else process.send(m);
    });
  }
  process.send({ event: 'ready' });
}

function percentile(sorted, q) {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

function runParent(mode, args) {
  const num = (i) => {
    const v = Number(args[i]);
    if (!Number.isFinite(v) || v < 0) fail(`bad argument ${i}: ${args[i]}`);
    return v;
  };
  let msg;
  let msgBytes;
  let isLatency;
  let count;
  let warmup = 0;
  let seconds;
  if (mode === 'tput' || mode === 'lat') {
    msgBytes = num(0);
    msg = { event: 'task', data: 'x'.repeat(msgBytes) };
    isLatency = mode === 'lat';
    if (isLatency) {
      warmup = num(1);
      count = num(2);
      seconds = num(3);
    } else {
      count = num(1);
      seconds = num(2);
    }
  } else if (mode === 'dict' || mode === 'dict_lat') {
    msg = SMALL_DICT;
    msgBytes = Buffer.byteLength(JSON.stringify(SMALL_DICT));
    isLatency = mode === 'dict_lat';
    if (isLatency) {
      warmup = num(0);
      count = num(1);
      seconds = num(2);
    } else {
      count = num(0);
      seconds = num(1);
    }
  } else {
    fail(`unknown mode ${mode}`);
  }

  const child = fork(__filename, [isLatency ? 'child-echo' : 'child-sink'], {
    serialization: 'json',
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  // Whatever happens, the run ends: the Python side has its own timeout too.
  const watchdog = setTimeout(() => {
    child.kill('SIGKILL');
    fail('timed out');
  }, 1000 * (30 + 3 * seconds));
  let result = null;
  child.on('error', (err) => fail(`child error: ${err}`));
  child.on('exit', (code, signal) => {
    clearTimeout(watchdog);
    if (result === null) fail(`child exited early (code ${code}, signal ${signal})`);
    process.stdout.write(JSON.stringify(result) + '\n');
  });
  const nanos = BigInt(Math.round(seconds * 1e9));

  if (!isLatency) {
    let sent = 0;
    let inflight = 0;
    let inflightBytes = 0;
    let finished = false;
    let pumping = false;
    let t0 = 0n;
    let deadline = 0n;
    // Look at the clock about every 256 KiB (at most every 256 messages), as the Python side does.
    const checkEvery = Math.max(1, Math.min(256, Math.floor((256 * 1024) / Math.max(msgBytes, 1))));
    const onSent = (err) => {
      if (err) fail(`send failed: ${err}`);
      inflight--;
      inflightBytes -= msgBytes;
      if (!finished && !pumping && inflight <= MAX_INFLIGHT / 2
          && inflightBytes <= MAX_INFLIGHT_BYTES / 2) {
        pump();
      }
    };
    const pump = () => {
      pumping = true;
      while (sent < count && inflight < MAX_INFLIGHT && inflightBytes < MAX_INFLIGHT_BYTES) {
        if (sent % checkEvery === 0 && now() >= deadline) {
          count = sent;
          break;
        }
        inflight++;
        inflightBytes += msgBytes;
        sent++;
        child.send(msg, onSent);
      }
      pumping = false;
      if (sent >= count && !finished) {
        finished = true;
        child.send(END);
      }
    };
    child.on('message', (m) => {
      if (m.event === 'ready') {
        t0 = now();
        deadline = t0 + nanos;
        pump();
      } else if (m.event === 'done') {
        result = {
          t0_ns: t0.toString(), t_end_ns: m.t_end_ns, sent, received: m.received,
          bytes: m.bytes,
        };
      }
    });
  } else {
    const rtts = [];
    let warm = true;
    let i = 0;
    let tSend = 0n;
    let deadline = 0n;
    const next = () => {
      tSend = now();
      child.send(msg);
    };
    child.on('message', (m) => {
      if (m.event === 'ready') {
        deadline = now() + nanos;
        if (warmup === 0) {
          warm = false;
        }
        next();
        return;
      }
      const t = now();
      i++;
      if (warm) {
        if (i >= warmup || t >= deadline) {
          warm = false;
          i = 0;
          deadline = now() + nanos;
        }
        next();
        return;
      }
      rtts.push(Number(t - tSend));
      if (i >= count || t >= deadline) {
        rtts.sort((a, b) => a - b);
        result = { n: rtts.length, p50_ns: percentile(rtts, 0.5), p99_ns: percentile(rtts, 0.99) };
        child.send(END);
      } else {
        next();
      }
    });
  }
}

function fail(why) {
  process.stderr.write(`node_fork_bench: ${why}\n`);
  process.exit(2);
}

const [mode, ...rest] = process.argv.slice(2);
if (mode === 'child-sink') runChild('sink');
else if (mode === 'child-echo') runChild('echo');
else runParent(mode, rest);
