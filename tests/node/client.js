#!/usr/bin/env node
// A seqserve client in Node.js built from the .proto files alone (no generated code): create a
// session, feed it text, generate a few tokens, print what came back as one JSON object.
//
//   node tests/node/client.js HOST:PORT [--model=tok] [--text=hello] [--seed=7]
//                                      [--max-tokens=6] [--temperature=1] [--top-k=5]
//                                      [--route=node-client] [--ca=FILE] [--token=TOKEN]
//
// Every call carries the session's routing key as `x-seqserve-route` metadata (the key given
// with --route on CreateSession; afterwards the one in the session id), as a load balancer in
// front of several replicas needs.
//
// Used by tests/api/test_node_client.py, which checks the output against the Python client.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function parseArgs(argv) {
  const args = {
    model: 'tok', text: 'hello', seed: '7', 'max-tokens': '6', temperature: '1', 'top-k': '5',
    route: 'node-client',
  };
  const positional = [];
  for (const arg of argv) {
    const m = /^--([a-z-]+)=(.*)$/s.exec(arg);
    if (m) args[m[1]] = m[2];
    else positional.push(arg);
  }
  if (positional.length !== 1) {
    throw new Error('usage: client.js HOST:PORT [--model=..] [--text=..] [--seed=..] ...');
  }
  args.target = positional[0];
  return args;
}

function loadService() {
  const definition = protoLoader.loadSync('seqserve/v1/session_service.proto', {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto (session_id, not sessionId)
    longs: String, // int64 / uint64 as strings: no precision lost on seeds
    enums: String, // enum values by name, e.g. FINISH_REASON_MAX_TOKENS
    defaults: true,
    oneofs: true, // the set member of a oneof is named in a virtual field (e.g. input.kind)
  });
  return grpc.loadPackageDefinition(definition).seqserve.v1.SessionService;
}

// The routing key in a session id (`s_<key>.<random>`; the whole id for older ids), sent as
// `x-seqserve-route` metadata on every call so a load balancer keeps a session on one replica.
function routeOf(sessionId) {
  const m = /^s_([A-Za-z0-9_-]{1,64})\./.exec(sessionId);
  return m ? m[1] : sessionId;
}

let bearer = null; // --token, or SEQSERVE_TOKEN: sent as `authorization: Bearer ...`

function routed(key) {
  const metadata = new grpc.Metadata();
  metadata.set('x-seqserve-route', key);
  if (bearer) metadata.set('authorization', `Bearer ${bearer}`);
  return metadata;
}

// Promise wrapper for a unary call, routed by `key`.
function unary(client, method, request, key) {
  return new Promise((resolve, reject) => {
    client[method](request, routed(key), {deadline: Date.now() + 20000}, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// Collect a server-streaming call's responses.
function collect(call) {
  return new Promise((resolve, reject) => {
    const out = [];
    call.on('data', (response) => out.push(response));
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  bearer = args.token || process.env.SEQSERVE_TOKEN || null;
  const SessionService = loadService();
  // --ca=FILE: TLS, trusting that CA for the server's certificate.
  const channelCredentials = args.ca
    ? grpc.credentials.createSsl(fs.readFileSync(args.ca))
    : grpc.credentials.createInsecure();
  const client = new SessionService(args.target, channelCredentials);
  try {
    const created = await unary(
      client, 'CreateSession', {model: args.model, seed: args.seed}, args.route,
    );
    const session = created.session;
    const key = routeOf(session.session_id);

    const step = await unary(client, 'Step', {
      session_id: session.session_id,
      request_id: 'node-1',
      input: {text: args.text},
      options: {top_k: Number(args['top-k'])},
    }, key);

    const tokens = await collect(
      client.Generate({
        session_id: session.session_id,
        sampling: {
          temperature: Number(args.temperature),
          max_tokens: Number(args['max-tokens']),
        },
      }, routed(key)),
    );

    // An error comes back as a gRPC status, by code.
    let missing = null;
    try {
      await unary(client, 'GetSession', {session_id: 's_no_such_session'}, 'nowhere');
    } catch (err) {
      missing = {code: err.code, name: grpc.status[err.code]};
    }

    const closed = await unary(client, 'CloseSession', {session_id: session.session_id}, key);

    const result = {
      session_id: session.session_id,
      model: session.model,
      version: Number(session.version),
      fingerprint: session.fingerprint,
      seed: session.seed,
      step: {
        request_id: step.request_id,
        position: Number(step.position),
        top: step.prediction.tokens.top.map((t) => ({id: t.id, prob: t.prob, text: t.text})),
      },
      generated: tokens.map((r) => ({
        id: r.token.id,
        text: r.token.text,
        position: Number(r.position),
        finish_reason: r.token.finish_reason,
      })),
      missing,
      closed_state: closed.session.state,
    };
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`node client failed: ${err.stack || err}\n`);
  process.exit(1);
});
