// A Node service's side of a Grape: grenache-nodejs-link talking to the
// grape at <url>, for the grape tests. <link> picks the Link version:
// `1.0.2` (grenache-nodejs-link) or `0.7.13` (grenache-nodejs-link-0.7).
//
//   node link.js <link> <url> announce <name> <port>  announce now and every second, as
//                                                      Grenache's examples do; print each answer
//   node link.js <link> <url> lookup <name>           print `lookup <json>` or `lookup error <message>`
//   node link.js <link> <url> put <value>             print `put <json>` (the key) or `put error <message>`
//   node link.js <link> <url> get <hash>              print `get <json>` (the value) or `get error <message>`
'use strict'
const [version, url, mode, arg, port] = process.argv.slice(2)
const packages = { '1.0.2': 'grenache-nodejs-link', '0.7.13': 'grenache-nodejs-link-0.7' }
const fail = (msg) => { console.error(msg); process.exit(1) }
if (!packages[version]) fail(`unknown link version ${version}; use ${Object.keys(packages).join(' or ')}`)
const installed = require(`${packages[version]}/package.json`).version
if (installed !== version) fail(`${packages[version]} is ${installed}, not ${version}: run npm ci in tests/node`)
const Link = require(packages[version])

const link = new Link({ grape: url })
link.start()
// One line per answer: `<mode> <json>` or `<mode> error <message>`.
const print = (err, data) => console.log(err ? `${mode} error ${err.message}` : `${mode} ${JSON.stringify(data)}`)
const once = (err, data) => { print(err, data); link.stop(); process.exit(0) }
if (mode !== 'announce') setTimeout(() => fail(`timed out in mode ${mode}`), 20000).unref()

if (mode === 'announce') {
  const announce = () => link.announce(arg, Number(port), {}, print)
  announce()
  setInterval(announce, 1000)
} else if (mode === 'lookup') {
  link.lookup(arg, {}, once)
} else if (mode === 'put') {
  link.put({ v: arg }, once)
} else if (mode === 'get') {
  link.get(arg, once)
} else {
  fail(`unknown mode ${mode}`)
}
