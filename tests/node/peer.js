// A Grenache-style Node.js peer on utp-native (the libutp binding Grenache's
// Node stack uses), written from docs/wire.md for the interop tests:
// one JSON message per uTP packet, the punch is the two bytes C3 BF, and one
// UDP socket carries uTP and punches. Services are found through Grapes with
// the real grenache-nodejs-link (1.0.2, or 0.7.13 with --link 0.7).
//
//   node peer.js vectors <port>      send TV-2 and TV-4 to 127.0.0.1:<port>, print each reply
//   node peer.js punch <port>        punch 127.0.0.1:<port>, wait for the punch back
//   node peer.js serve [punchPort]   answer fibonacci requests (or, with "replyBytes" in the
//                                    payload, a string making the reply that long); print each
//                                    request with its packet's size; punch punchPort every second
//       --quiet 1                      print nothing per request: one JSON parse and one stringify
//                                      each, as Grenache's Node server does (cargo xtask bench)
//   node peer.js echo                write every chunk received back unchanged (the transport
//                                    floor of cargo xtask bench)
//       --grape <url>                  and announce fibonacci_worker through that Grape every
//                                      second, as the tutorial's servers do
//       --punch <service>              and every second look <service> up through the Grape
//                                      and punch every peer found (rpc_server_behind_nat.js)
//   node peer.js consume --grape <url>
//                                    the tutorial's public consumer (rpc_server_public.js):
//                                    announce fibonacci_consumer through the Grape every
//                                    second; on every punch, punch back and send
//                                    {"length":10} to the puncher; print each reply
//   node peer.js link-call <grapeUrl> <service> <payload>
//                                    look <service> up through the Grape, send the request
//                                    envelope to the first peer found, print the reply
//   node peer.js flight <port> <n> <replyBytes>
//                                    on ONE connection, write n "echo" requests at once, each
//                                    sized so the echoed reply is replyBytes long; print how
//                                    many replies parsed, as Grenache parses them (per packet)
//   node peer.js broker <port> <true|false>
//                                    register with fibo_broker at 127.0.0.1:<port> as a server
//                                    (true) or a client of fibonacci_worker, read the reply as the
//                                    tutorial's nat_w_broker/register.js does, and print the peers
//                                    it keeps and whether each key is md5(JSON.stringify(entry))
//   --link 0.7                       use grenache-nodejs-link 0.7.13 instead of 1.0.2
'use strict'
const { createHash, randomUUID } = require('crypto')
const utp = require('utp-native')

const PUNCH = Buffer.from('ÿ') // UTF-8: C3 BF, as boxgloves sends it
const TV2 = '["3f2cf13b-da02-4abf-bb01-9306b37281a3","rpc_test","hello"]'
const TV4 = '["f5e82789-41d0-450f-88ed-cd320deb8fac","127.0.0.1:38772",{"length":10}]'
const positional = []
const flags = {}
for (let i = 2; i < process.argv.length; i++) {
  const word = process.argv[i]
  if (word.startsWith('--')) flags[word.slice(2)] = process.argv[++i]
  else positional.push(word)
}
const [mode, arg] = positional
const fail = (msg) => { console.error(msg); process.exit(1) }

// A started Link to flags.grape (or `grape`), of the version --link names.
function startLink (grape = flags.grape) {
  const Link = require(flags.link === '0.7' ? 'grenache-nodejs-link-0.7' : 'grenache-nodejs-link')
  const link = new Link({ grape })
  link.start()
  return link
}

// Looks `service` up until a Grape knows it. Each try uses a fresh Link: a
// Link keeps a failed lookup for 10 s (docs/wire.md §6.2).
async function lookUntilFound (grape, service) {
  for (;;) {
    const link = startLink(grape)
    const found = await new Promise((resolve) => link.lookup(service, {}, (err, dests) => {
      if (err) console.log(`lookup ${service}: ${err.message}`)
      resolve(err ? null : dests)
    }))
    link.stop()
    if (found) return found
    await new Promise((resolve) => setTimeout(resolve, 500))
  }
}

function fibonacci (n) {
  const out = []
  for (let i = 0, a = 1, b = 1; i < n; i++) { out.push(a); [a, b] = [b, a + b] }
  return out
}

// A string that makes JSON.stringify([rid, null, string]) exactly `bytes` long.
function padFor (rid, bytes) {
  return 'x'.repeat(bytes - JSON.stringify([rid, null, '']).length)
}

// Sends one message on a fresh connection and resolves with the reply text.
function ask (socket, port, message, host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const conn = socket.connect(Number(port), host)
    conn.on('error', reject)
    conn.once('data', (chunk) => resolve(chunk.toString()))
    conn.write(Buffer.from(message))
  })
}

async function main () {
  const socket = utp()
  await new Promise((resolve) => socket.listen(0, resolve))
  if (!['serve', 'consume', 'echo'].includes(mode)) setTimeout(() => fail(`timed out in mode ${mode}`), 20000).unref()
  if (mode === 'vectors') {
    for (const [name, message] of [['TV-2', TV2], ['TV-4', TV4]]) {
      console.log(`${name} reply ${await ask(socket, arg, message)}`)
    }
    process.exit(0)
  } else if (mode === 'link-call') {
    const [, grape, service, payload] = positional
    const dests = await lookUntilFound(grape, service)
    console.log(`found ${service} at ${dests.join(' ')}`)
    const [host, port] = dests[0].split(':')
    const reply = await ask(socket, port, JSON.stringify([randomUUID(), service, JSON.parse(payload)]), host)
    const [, err, res] = JSON.parse(reply)
    console.log(err ? `error ${err}` : `reply ${JSON.stringify(res)}`)
    process.exit(0)
  } else if (mode === 'broker') {
    const isServer = positional[2] === 'true'
    const request = [randomUUID(), 'fibo_broker', { service: 'fibonacci_worker', server: isServer }]
    const [, err, data] = JSON.parse(await ask(socket, arg, JSON.stringify(request)))
    if (err) fail(`error ${err}`)
    // register.js: a server keeps the clients, a client the servers.
    const pool = data.fibonacci_worker
    const peers = Object.keys(pool).filter((k) => isServer ? !pool[k].server : pool[k].server).map((k) => pool[k])
    // broker.js keys each entry by md5(JSON.stringify(payload)).
    const md5 = (entry) => createHash('md5').update(JSON.stringify(entry)).digest('hex')
    const keyed = Object.keys(pool).every((k) => md5(pool[k]) === k)
    console.log(`registered from port ${socket.address().port}; every key is md5(JSON.stringify(entry)): ${keyed}`)
    console.log(`peers ${JSON.stringify(peers)}`)
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
      // A caller that went away (UTP_ETIMEDOUT, a reset): that connection
      // ends, the server goes on, as Grenache's server does.
      conn.on('error', (e) => console.log(`connection error: ${e.message}`))
      conn.on('data', (chunk) => {
        let rid, key, payload
        try { [rid, key, payload] = JSON.parse(chunk.toString()) } catch (e) {
          return console.log(`ERR_REQUEST_PARSE: ${chunk}`)
        }
        if (!flags.quiet) console.log(`request ${key} ${JSON.stringify(payload)} in ${chunk.length} bytes`)
        const result = payload.replyBytes ? padFor(rid, payload.replyBytes) : fibonacci(payload.length)
        conn.write(Buffer.from(JSON.stringify([rid, null, result])))
      })
    })
    socket.on('message', (msg, rinfo) => {
      if (msg.equals(PUNCH)) console.log(`punch from ${rinfo.address}:${rinfo.port}`)
    })
    const port = socket.address().port
    console.log(`listening on ${port}`)
    if (arg) {
      const punch = () => socket.send(PUNCH, 0, PUNCH.length, Number(arg), '127.0.0.1')
      punch()
      setInterval(punch, 1000)
    }
    if (flags.grape) {
      const link = startLink()
      let said = null // print an announce's answer only when it changes
      const announce = () => link.announce('fibonacci_worker', port, {}, (err, answer) => {
        const now = err ? `announce failed: ${err.message}` : `announced fibonacci_worker ${port}: ${JSON.stringify(answer)}`
        if (now !== said) console.log(now)
        said = now
      })
      announce()
      setInterval(announce, 1000)
      if (flags.punch) {
        const punchPeers = () => link.lookup(flags.punch, {}, (err, dests) => {
          if (err) return console.log(`lookup ${flags.punch}: ${err.message}`)
          for (const dest of dests) {
            const [host, destPort] = dest.split(':')
            socket.send(PUNCH, 0, PUNCH.length, Number(destPort), host)
          }
        })
        punchPeers()
        setInterval(punchPeers, 1000)
      }
    }
  } else if (mode === 'echo') {
    socket.on('connection', (conn) => {
      conn.on('error', (e) => console.log(`connection error: ${e.message}`))
      conn.on('data', (chunk) => conn.write(chunk))
    })
    console.log(`listening on ${socket.address().port}`)
  } else if (mode === 'consume') {
    if (!flags.grape) fail('consume needs --grape <url>')
    const port = socket.address().port
    console.log(`listening on ${port}`)
    socket.on('message', async (msg, rinfo) => {
      if (!msg.equals(PUNCH)) return
      console.log(`punch from ${rinfo.address}:${rinfo.port}`)
      socket.send(PUNCH, 0, PUNCH.length, rinfo.port, rinfo.address)
      const request = [randomUUID(), `${rinfo.address}:${rinfo.port}`, { length: 10 }]
      try {
        const [, err, res] = JSON.parse(await ask(socket, rinfo.port, JSON.stringify(request), rinfo.address))
        console.log(err ? `error ${err}` : `sequence ${JSON.stringify(res)}`)
      } catch (e) {
        console.log(`request failed: ${e.message}`)
      }
    })
    const link = startLink()
    const announce = () => link.announce('fibonacci_consumer', port, {}, () => {})
    announce()
    setInterval(announce, 1000)
  } else if (mode === 'flight') {
    const [count, replyBytes] = positional.slice(2).map(Number)
    const conn = socket.connect(Number(arg), '127.0.0.1')
    conn.on('error', (e) => fail(`flight: ${e.message}`))
    const answered = new Set()
    const sizes = []
    let parseErrors = 0
    const report = () => `answers ${answered.size} of ${count}, packets ${sizes.join(',')}, parse errors ${parseErrors}`
    setTimeout(() => fail(`timed out: ${report()}`), 15000).unref()
    for (let i = 0; i < count; i++) {
      const rid = `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`
      conn.write(Buffer.from(JSON.stringify([rid, 'echo', padFor(rid, replyBytes)])))
    }
    conn.on('data', (chunk) => {
      let reply
      try { reply = JSON.parse(chunk.toString()) } catch (e) {
        parseErrors++
        return console.log(`ERR_REQUEST_PARSE: ${chunk.length} bytes`)
      }
      sizes.push(chunk.length)
      answered.add(reply[0])
      if (answered.size === count) {
        console.log(report())
        process.exit(0)
      }
    })
  } else {
    fail(`unknown mode ${mode}`)
  }
}
main().catch((e) => fail(e.stack))
