'use strict';
// A Node child for procwire's tests: started by a Python parent with procwire.spawn().
// Echoes every message; handles:
//   message + net.Server  -> accepts one connection on it, writes "hello from node", reports
//   message + net.Socket  -> writes "via socket" on it and ends it, reports
//   {cmd: 'give'}         -> listens on 127.0.0.1:0 and sends that server to the parent as a
//                            handle, then {after: true} (Node queues it until the ACK)
//   {cmd: 'exit', code}   -> exits with that code
const net = require('net');

process.on('message', (m, handle) => {
  if (handle) {
    if (handle instanceof net.Server) {
      handle.once('connection', (s) => {
        s.end('hello from node');
        handle.close();
      });
      process.send({ gotHandle: 'net.Server', msg: m });
    } else if (handle instanceof net.Socket) {
      handle.end('via socket');
      process.send({ gotHandle: 'net.Socket', msg: m });
    } else {
      process.send({ gotHandle: String(handle && handle.constructor && handle.constructor.name), msg: m });
    }
    return;
  }
  if (m && m.cmd === 'give') {
    const server = net.createServer((s) => s.end('served by the parent?'));
    server.listen(0, '127.0.0.1', () => {
      const port = server.address().port;
      process.send({ port }, server, (err) => {
        if (err) process.send({ error: String(err) });
        server.close();
      });
      process.send({ after: true });
    });
    return;
  }
  if (m && m.cmd === 'exit') {
    process.exit(m.code);
  }
  process.send(m);
});
process.send({ ready: process.pid });
