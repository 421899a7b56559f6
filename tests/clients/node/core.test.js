'use strict';
// Core AMQP 0-9-1 behaviour as seen by amqplib (promise API).
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node --test tests/clients/node/
//
// Every test passes against RabbitMQ 3.10; Warren must behave the same. If the
// broker cannot be reached every test fails (never skips).

const { describe, test, after, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const amqp = require('amqplib');

const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let conn; // set once connected
let connecting;
let created; // { queues: [], exchanges: [] } for the running test

function uniq(base) {
  return `warren-test.node.${base}.${crypto.randomBytes(6).toString('hex')}`;
}

// Every test starts by connecting (once, shared): if the broker is unreachable each
// test fails with this error rather than being skipped or cancelled.
function connection() {
  if (!connecting) {
    connecting = amqp.connect(AMQP_URL).then((c) => {
      c.on('error', () => {});
      conn = c;
      return c;
    }, (e) => {
      throw new Error(`cannot connect to the AMQP broker at ${AMQP_URL} (set AMQP_URL): ${e.message}`);
    });
  }
  return connecting;
}

async function channel({ confirm = false } = {}) {
  await connection();
  const ch = confirm ? await conn.createConfirmChannel() : await conn.createChannel();
  ch.on('error', () => {}); // channel errors are asserted through rejected promises
  return ch;
}

async function queue(ch, base, opts = {}) {
  const name = uniq(base);
  await ch.assertQueue(name, { durable: false, ...opts });
  created.queues.push(name);
  return name;
}

async function exchange(ch, base, type, opts = {}) {
  const name = uniq(base);
  await ch.assertExchange(name, type, { durable: false, ...opts });
  created.exchanges.push(name);
  return name;
}

// publish on a confirm channel and wait until the broker confirmed it
async function publish(ch, ex, key, body, opts = {}) {
  ch.publish(ex, key, Buffer.from(body), opts);
  await ch.waitForConfirms();
}

// basic.get until empty; if `expect` is given poll up to `timeoutMs` for that many
async function getAll(ch, q, { expect = 0, timeoutMs = 3000 } = {}) {
  const out = [];
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await ch.get(q, { noAck: true });
    if (m) { out.push(m); continue; }
    if (out.length >= expect || Date.now() > deadline) return out;
    await sleep(20);
  }
}

async function waitFor(pred, timeoutMs = 3000) {
  const deadline = Date.now() + timeoutMs;
  while (!pred() && Date.now() < deadline) await sleep(10);
}

const bodies = (msgs) => msgs.map((m) => m.content.toString());

describe('amqplib against ' + AMQP_URL.replace(/\/\/[^@]*@/, '//'), () => {
  after(async () => {
    if (conn) await conn.close();
  });

  beforeEach(() => { created = { queues: [], exchanges: [] }; });

  afterEach(async () => {
    if (!conn) return;
    const ch = await conn.createChannel();
    ch.on('error', () => {});
    for (const q of created.queues) await ch.deleteQueue(q);
    for (const x of created.exchanges) await ch.deleteExchange(x);
    await ch.close();
  });

  test('publish, consume, ack', async () => {
    const ch = await channel({ confirm: true });
    const q = await queue(ch, 'pca');
    for (let i = 0; i < 5; i++) {
      ch.publish('', q, Buffer.from(`m${i}`), { contentType: 'text/plain', headers: { k: i }, persistent: true });
    }
    await ch.waitForConfirms();
    const got = [];
    const { consumerTag } = await ch.consume(q, (m) => got.push(m), { noAck: false });
    await waitFor(() => got.length >= 5);
    assert.deepEqual(bodies(got), ['m0', 'm1', 'm2', 'm3', 'm4']);
    assert.deepEqual(got.map((m) => m.fields.deliveryTag), [1, 2, 3, 4, 5]);
    assert.ok(got.every((m) => m.fields.redelivered === false));
    assert.ok(got.every((m) => m.fields.consumerTag === consumerTag));
    assert.equal(got[0].properties.contentType, 'text/plain');
    assert.equal(got[0].properties.deliveryMode, 2);
    assert.deepEqual(got.map((m) => m.properties.headers.k), [0, 1, 2, 3, 4]);
    ch.ack(got[4], true); // multiple
    const ok = await ch.checkQueue(q);
    assert.equal(ok.messageCount, 0);
    assert.equal(ok.consumerCount, 1);
    await ch.cancel(consumerTag);
    await ch.close();
  });

  test('basic.get and get-empty, nack with requeue', async () => {
    const ch = await channel({ confirm: true });
    const q = await queue(ch, 'get');
    assert.equal(await ch.get(q), false);
    await publish(ch, '', q, 'a');
    await publish(ch, '', q, 'b');
    const a = await ch.get(q, { noAck: false });
    const b = await ch.get(q, { noAck: false });
    assert.equal(a.fields.messageCount, 1);
    ch.nack(b, false, true);
    ch.nack(a, false, true);
    const again = await getAll(ch, q, { expect: 2 });
    assert.deepEqual(bodies(again), ['a', 'b']);
    assert.ok(again.every((m) => m.fields.redelivered === true));
    await ch.close();
  });

  test('publisher confirms: ack, and nack on reject-publish overflow', async () => {
    const ch = await channel({ confirm: true });
    const q = await queue(ch, 'confirm', { arguments: { 'x-max-length': 1, 'x-overflow': 'reject-publish' } });
    const results = [];
    const cb = (i) => (err) => results.push([i, err ? 'nack' : 'ack']);
    ch.publish('', q, Buffer.from('first'), {}, cb(1));
    ch.publish('', q, Buffer.from('second'), {}, cb(2));
    await assert.rejects(ch.waitForConfirms());
    await waitFor(() => results.length === 2);
    results.sort((x, y) => x[0] - y[0]);
    assert.deepEqual(results, [[1, 'ack'], [2, 'nack']]);
    assert.deepEqual(bodies(await getAll(ch, q)), ['first']);
    await ch.close();
  });

  test('mandatory unroutable: basic.return 312 NO_ROUTE before the confirm', async () => {
    const ch = await channel({ confirm: true });
    const x = await exchange(ch, 'noroute', 'direct');
    const events = [];
    ch.on('return', (m) => events.push(['return', m.fields.replyCode, m.fields.replyText,
      m.fields.exchange, m.fields.routingKey, m.content.toString()]));
    await new Promise((resolve, reject) => {
      ch.publish(x, 'nowhere', Buffer.from('lost'), { mandatory: true }, (err) => {
        events.push(['confirm', err ? 'nack' : 'ack']);
        if (err) reject(err); else resolve();
      });
    });
    assert.deepEqual(events, [
      ['return', 312, 'NO_ROUTE', x, 'nowhere', 'lost'],
      ['confirm', 'ack'],
    ]);
    await ch.close();
  });

  test('topic routing with * and #', async () => {
    const ch = await channel({ confirm: true });
    const x = await exchange(ch, 'topic', 'topic');
    const keys = ['', 'a', 'a.b', 'a.x.b', 'a.x.y.b', 'a.b.c', 'b'];
    const expect = {
      '#': keys,
      '*': ['a', 'b'],
      'a.*': ['a.b'],
      'a.#': ['a', 'a.b', 'a.x.b', 'a.x.y.b', 'a.b.c'],
      'a.#.b': ['a.b', 'a.x.b', 'a.x.y.b'],
      '#.b': ['a.b', 'a.x.b', 'a.x.y.b', 'b'],
    };
    const qs = {};
    for (const pattern of Object.keys(expect)) {
      qs[pattern] = await queue(ch, 'topic');
      await ch.bindQueue(qs[pattern], x, pattern);
    }
    for (const k of keys) ch.publish(x, k, Buffer.from(k || '<empty>'));
    await ch.waitForConfirms();
    for (const [pattern, want] of Object.entries(expect)) {
      assert.deepEqual(bodies(await getAll(ch, qs[pattern])), want.map((k) => k || '<empty>'),
        `pattern ${pattern}`);
    }
    await ch.close();
  });

  test('dead lettering on reject records x-death', async () => {
    const ch = await channel({ confirm: true });
    const dlx = await exchange(ch, 'dlx', 'fanout');
    const dlq = await queue(ch, 'dlq');
    await ch.bindQueue(dlq, dlx, '');
    const q = await queue(ch, 'src', { deadLetterExchange: dlx });
    await publish(ch, '', q, 'bad');
    const m = await ch.get(q, { noAck: false });
    ch.reject(m, false);
    const [dead] = await getAll(ch, dlq, { expect: 1 });
    assert.equal(dead.content.toString(), 'bad');
    assert.equal(dead.fields.routingKey, q);
    const h = dead.properties.headers;
    assert.equal(h['x-death'].length, 1);
    const d = h['x-death'][0];
    assert.equal(Number(d.count), 1);
    assert.equal(d.reason, 'rejected');
    assert.equal(d.queue, q);
    assert.equal(d.exchange, '');
    assert.deepEqual(d['routing-keys'], [q]);
    assert.ok('time' in d);
    assert.equal(h['x-first-death-queue'], q);
    assert.equal(h['x-first-death-reason'], 'rejected');
    assert.equal(h['x-first-death-exchange'], '');
    await ch.close();
  });

  test('TTL: expired messages are dead-lettered (reason expired) and never delivered', async () => {
    const ch = await channel({ confirm: true });
    const dlx = await exchange(ch, 'ttl-dlx', 'fanout');
    const dlq = await queue(ch, 'ttl-dlq');
    await ch.bindQueue(dlq, dlx, '');
    const q = await queue(ch, 'ttl', { deadLetterExchange: dlx });
    await publish(ch, '', q, 'short', { expiration: '100' });
    const [dead] = await getAll(ch, dlq, { expect: 1 });
    assert.equal(dead.content.toString(), 'short');
    assert.equal(dead.properties.expiration, undefined);
    const d = dead.properties.headers['x-death'][0];
    assert.equal(d.reason, 'expired');
    assert.equal(d['original-expiration'], '100');
    assert.equal(d.queue, q);

    const q2 = await queue(ch, 'ttl-q', { messageTtl: 100 });
    await publish(ch, '', q2, 'gone');
    await sleep(300);
    assert.equal(await ch.get(q2), false);
    const got = [];
    await ch.consume(q2, (msg) => got.push(msg), { noAck: true });
    await sleep(200);
    assert.equal(got.length, 0);
    await ch.close();
  });

  test('QoS prefetch 2 without acks delivers exactly 2', async () => {
    const ch = await channel({ confirm: true });
    const q = await queue(ch, 'qos');
    for (let i = 0; i < 5; i++) ch.publish('', q, Buffer.from(`m${i}`));
    await ch.waitForConfirms();
    await ch.prefetch(2);
    const got = [];
    await ch.consume(q, (m) => got.push(m), { noAck: false });
    await waitFor(() => got.length >= 2);
    await sleep(300);
    assert.deepEqual(bodies(got), ['m0', 'm1']);
    ch.ack(got[0]);
    await waitFor(() => got.length >= 3);
    await sleep(200);
    assert.deepEqual(bodies(got), ['m0', 'm1', 'm2']);
    await ch.close();
  });

  test('passive declare of a missing queue closes the channel with 404', async () => {
    const ch = await channel();
    let closed = false;
    ch.on('close', () => { closed = true; });
    await assert.rejects(ch.checkQueue(uniq('missing')), (err) => {
      assert.equal(err.code, 404);
      assert.match(err.message, /NOT_FOUND/);
      return true;
    });
    await waitFor(() => closed);
    assert.ok(closed);
    // the connection survives a channel error
    const ch2 = await channel();
    await ch2.close();
  });

  test('redeclare with different durable closes the channel with 406', async () => {
    const ch = await channel();
    const q = await queue(ch, 'redeclare', { durable: false });
    await assert.rejects(ch.assertQueue(q, { durable: true }), (err) => {
      assert.equal(err.code, 406);
      assert.match(err.message, /PRECONDITION_FAILED/);
      return true;
    });
  });

  test('publishing to a missing exchange closes the channel with 404', async () => {
    const ch = await channel({ confirm: true });
    const errors = [];
    ch.on('error', (e) => errors.push(e));
    ch.publish(uniq('no-such-exchange'), 'k', Buffer.from('x'));
    await assert.rejects(ch.waitForConfirms());
    await waitFor(() => errors.length > 0);
    assert.equal(errors[0].code, 404);
  });
});
