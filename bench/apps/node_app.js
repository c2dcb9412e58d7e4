// Minimal node HTTP app for the PM2 cluster-mode peer benchmark: a fixed plain-text
// answer, and a complete graceful stop, so that failures during `pm2 reload` are PM2's and
// not the app's. PM2 sends SIGINT, then SIGKILL after kill_timeout (1.6 s by default):
// stop listening, answer every request from then on with `Connection: close` (a busy
// keep-alive connection would otherwise stay open until the SIGKILL resets it), close
// idle keep-alive connections, and exit once the last connection is gone.
'use strict';
const http = require('http');

const body = `pid=${process.pid} server=node\n`;
let closing = false;
const server = http.createServer((req, res) => {
  const headers = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
  if (closing) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});
server.listen(Number(process.env.PORT || 8080), '127.0.0.1');

process.on('SIGINT', () => {
  closing = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
