// Minimal node HTTP app for the PM2 cluster-mode peer benchmark: a fixed plain-text
// answer, and the graceful stop PM2's documentation asks for (PM2 sends SIGINT, then
// SIGKILL after kill_timeout): stop listening, let open requests finish, then exit.
'use strict';
const http = require('http');

const body = `pid=${process.pid} server=node\n`;
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});
server.listen(Number(process.env.PORT || 8080), '127.0.0.1');

process.on('SIGINT', () => {
  server.close(() => process.exit(0));
  // Node >= 19: close() also closes idle keep-alive connections; busy ones get
  // `Connection: close` on their current response.
});
