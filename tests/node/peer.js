// A Grenache-style Node.js peer on utp-native (the libutp binding Grenache's
// Node stack uses), written from docs/wire.md for the interop tests:
// one JSON message per uTP packet, the punch is the two bytes C3 BF, and one
// UDP socket carries uTP and punches.
//
//   node peer.js vectors <port>      send TV-2 and TV-4 to 127.0.0.1:<port>, print each reply
//   node peer.js punch <port>        punch 127.0.0.1:<port>, wait for the punch back
//   node peer.js serve [punchPort]   answer fibonacci requests; punch punchPort every second
'use strict'
const utp = require('utp-native')

const PUNCH = Buffer.from('ÿ') // UTF-8: C3 BF, as boxgloves sends it
const TV2 = '["3f2cf13b-da02-4abf-bb01-9306b37281a3","rpc_test","hello"]'
const TV4 = '["f5e82789-41d0-450f-88ed-cd320deb8fac","127.0.0.1:38772",{"length":10}]'
const [mode, arg] = process.argv.slice(2)
const fail = (msg) => { console.error(msg); process.exit(1) }

function fibonacci (n) {
  const out = []
  for (let i = 0, a = 1, b = 1; i < n; i++) { out.push(a); [a, b] = [b, a + b] }
  return out
}

// Sends one message on a fresh connection and resolves with the reply text.
function ask (socket, port, message) {
  return new Promise((resolve, reject) => {
    const conn = socket.connect(Number(port), '127.0.0.1')
    conn.on('error', reject)
    conn.once('data', (chunk) => resolve(chunk.toString()))
    conn.write(Buffer.from(message))
  })
}

async function main () {
  const socket = utp()
  await new Promise((resolve) => socket.listen(0, resolve))
  if (mode !== 'serve') setTimeout(() => fail(`timed out in mode ${mode}`), 20000).unref()
  if (mode === 'vectors') {
    for (const [name, message] of [['TV-2', TV2], ['TV-4', TV4]]) {
      console.log(`${name} reply ${await ask(socket, arg, message)}`)
    }
    process.exit(0)
  } else if (mode === 'punch') {
    socket.on('message', (msg, rinfo) => {
      if (msg.equals(PUNCH) && rinfo.port === Number(arg)) {
        console.log(`punched back by ${rinfo.address}:${rinfo.port}`)
        process.exit(0)
      }
    })
    socket.send(PUNCH, 0, PUNCH.length, Number(arg), '127.0.0.1')
  } else if (mode === 'serve') {
    socket.on('connection', (conn) => {
      conn.on('data', (chunk) => {
        let rid, key, payload
        try { [rid, key, payload] = JSON.parse(chunk.toString()) } catch (e) {
          return console.log(`ERR_REQUEST_PARSE: ${chunk}`)
        }
        console.log(`request ${key} ${JSON.stringify(payload)}`)
        conn.write(Buffer.from(JSON.stringify([rid, null, fibonacci(payload.length)])))
      })
    })
    socket.on('message', (msg, rinfo) => {
      if (msg.equals(PUNCH)) console.log(`punch from ${rinfo.address}:${rinfo.port}`)
    })
    console.log(`listening on ${socket.address().port}`)
    if (arg) {
      const punch = () => socket.send(PUNCH, 0, PUNCH.length, Number(arg), '127.0.0.1')
      punch()
      setInterval(punch, 1000)
    }
  } else {
    fail(`unknown mode ${mode}`)
  }
}
main().catch((e) => fail(e.stack))
