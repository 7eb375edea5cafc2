'use strict';
// An SFTP version 3 server on Node's ssh2 (no protocol extensions), serving one folder as "/"
// to one user with a password, on 127.0.0.1. Started by loopback/servers.py for the tests:
//   node server.js PORT ROOT HOST_KEY_FILE USER  (the password on stdin, one line)
// Renames replace an existing file, as POSIX rename does. SETSTAT is answered OK and ignored.
// Requests on one open file run in order, as the protocol requires; requests on paths (mkdir,
// open, rename...) run as they come, concurrently, as a server with a thread pool may run them.

const fs = require('fs');
const path = require('path');
const { Server, utils: { sftp: { STATUS_CODE, flagsToString } } } = require('ssh2');

const [port, root, hostKeyFile, user] = process.argv.slice(2);
const password = fs.readFileSync(0, 'utf8').split('\n')[0];

function real(virtual) {
  // The file under ROOT for a client's path; paths never leave ROOT.
  const normal = path.posix.normalize('/' + virtual);
  return path.join(root, normal);
}

function failure(sftp, reqid, err) {
  const code = err && err.code === 'ENOENT' ? STATUS_CODE.NO_SUCH_FILE
    : err && (err.code === 'EACCES' || err.code === 'EPERM') ? STATUS_CODE.PERMISSION_DENIED
    : STATUS_CODE.FAILURE;
  sftp.status(reqid, code, err ? err.code : undefined);
}

function attrs(stats) {
  return { mode: stats.mode, uid: stats.uid, gid: stats.gid, size: stats.size,
           atime: Math.floor(stats.atimeMs / 1000), mtime: Math.floor(stats.mtimeMs / 1000) };
}

function serve(sftp) {
  const files = new Map();
  const folders = new Map();
  const queues = new Map();
  let next = 0;
  const handle = () => { const h = Buffer.alloc(4); h.writeUInt32BE(next++); return h; };
  const key = (h) => h.readUInt32BE(0);
  const inOrder = (h, work) => {  // run `work(done)` after the handle's earlier requests
    const k = key(h);
    const queued = (queues.get(k) || Promise.resolve()).then(() => new Promise(work));
    queues.set(k, queued);
  };

  sftp.on('OPEN', (reqid, filename, flags) => {
    fs.open(real(filename), flagsToString(flags) || 'r', 0o644, (err, fd) => {
      if (err) return failure(sftp, reqid, err);
      const h = handle();
      files.set(key(h), fd);
      sftp.handle(reqid, h);
    });
  });
  sftp.on('WRITE', (reqid, h, offset, data) => inOrder(h, (done) => {
    const fd = files.get(key(h));
    if (fd === undefined) { sftp.status(reqid, STATUS_CODE.FAILURE); return done(); }
    fs.write(fd, data, 0, data.length, offset, (err) => {
      if (err) failure(sftp, reqid, err); else sftp.status(reqid, STATUS_CODE.OK);
      done();
    });
  }));
  sftp.on('READ', (reqid, h, offset, length) => {
    const fd = files.get(key(h));
    if (fd === undefined) return sftp.status(reqid, STATUS_CODE.FAILURE);
    const buffer = Buffer.alloc(length);
    fs.read(fd, buffer, 0, length, offset, (err, n) => {
      if (err) return failure(sftp, reqid, err);
      if (n === 0) return sftp.status(reqid, STATUS_CODE.EOF);
      sftp.data(reqid, buffer.subarray(0, n));
    });
  });
  sftp.on('FSTAT', (reqid, h) => {
    const fd = files.get(key(h));
    if (fd === undefined) return sftp.status(reqid, STATUS_CODE.FAILURE);
    fs.fstat(fd, (err, stats) => err ? failure(sftp, reqid, err) : sftp.attrs(reqid, attrs(stats)));
  });
  sftp.on('CLOSE', (reqid, h) => inOrder(h, (done) => {
    const k = key(h);
    queues.delete(k);
    if (folders.delete(k)) { sftp.status(reqid, STATUS_CODE.OK); return done(); }
    const fd = files.get(k);
    if (fd === undefined) { sftp.status(reqid, STATUS_CODE.FAILURE); return done(); }
    files.delete(k);
    fs.close(fd, (err) => {
      if (err) failure(sftp, reqid, err); else sftp.status(reqid, STATUS_CODE.OK);
      done();
    });
  }));
  for (const event of ['STAT', 'LSTAT']) {
    sftp.on(event, (reqid, p) => {
      fs.stat(real(p), (err, stats) => err ? failure(sftp, reqid, err)
        : sftp.attrs(reqid, attrs(stats)));
    });
  }
  sftp.on('SETSTAT', (reqid) => sftp.status(reqid, STATUS_CODE.OK));
  sftp.on('FSETSTAT', (reqid) => sftp.status(reqid, STATUS_CODE.OK));
  sftp.on('REALPATH', (reqid, p) => {
    const normal = path.posix.normalize('/' + p);
    sftp.name(reqid, [{ filename: normal, longname: normal, attrs: {} }]);
  });
  sftp.on('MKDIR', (reqid, p) => {
    fs.mkdir(real(p), 0o755, (err) => err ? failure(sftp, reqid, err)
      : sftp.status(reqid, STATUS_CODE.OK));
  });
  sftp.on('RMDIR', (reqid, p) => {
    fs.rmdir(real(p), (err) => err ? failure(sftp, reqid, err)
      : sftp.status(reqid, STATUS_CODE.OK));
  });
  sftp.on('REMOVE', (reqid, p) => {
    fs.unlink(real(p), (err) => err ? failure(sftp, reqid, err)
      : sftp.status(reqid, STATUS_CODE.OK));
  });
  sftp.on('RENAME', (reqid, from, to) => {
    fs.rename(real(from), real(to), (err) => err ? failure(sftp, reqid, err)
      : sftp.status(reqid, STATUS_CODE.OK));
  });
  sftp.on('OPENDIR', (reqid, p) => {
    fs.readdir(real(p), (err, names) => {
      if (err) return failure(sftp, reqid, err);
      const h = handle();
      folders.set(key(h), names);
      sftp.handle(reqid, h);
    });
  });
  sftp.on('READDIR', (reqid, h) => {
    const names = folders.get(key(h));
    if (names === undefined) return sftp.status(reqid, STATUS_CODE.FAILURE);
    if (names.length === 0) return sftp.status(reqid, STATUS_CODE.EOF);
    const batch = names.splice(0, names.length);
    sftp.name(reqid, batch.map((name) => ({ filename: name, longname: name, attrs: {} })));
  });
}

new Server({ hostKeys: [fs.readFileSync(hostKeyFile)] }, (client) => {
  client.on('authentication', (ctx) => {
    if (ctx.method === 'password' && ctx.username === user && ctx.password === password) {
      return ctx.accept();
    }
    ctx.reject(['password']);
  }).on('ready', () => {
    client.on('session', (accept) => {
      accept().on('sftp', (accept) => serve(accept()));
    });
  }).on('error', () => {});
}).listen(Number(port), '127.0.0.1', () => console.log('listening'));
