// A real OpenID Provider for gprxy's end-to-end tests: panva's oidc-provider (OpenID Certified),
// pinned by package-lock.json and installed by scripts/bootstrap.sh outside the clone.
//
//   node provider.mjs CONFIG.json
//
// GPRXY_NODE_MODULES names the node_modules folder holding oidc-provider. The provider listens
// on 127.0.0.1 on a free port, its issuer is http://127.0.0.1:PORT (no trailing slash: libpq
// appends /.well-known/... to it), and a control listener on another free port lets the test
// rotate the signing key and read request counts. The first line on stdout is
// {"port": PORT, "control_port": PORT}. The process exits when its stdin closes (the harness
// died) or on SIGTERM.
//
// What it issues (the configuration a DBA would copy is in README's Identity-provider notes):
// RFC 9068 JWT access tokens for the resource JWT_RESOURCE (audience CONFIG.audience), which is
// every client's default resource (defaultResource), also at the token endpoint of the device and
// refresh grants (useGrantedResource): psql 18 and `gprxy login` cannot send `resource`. Opaque
// access tokens for OPAQUE_RESOURCE, asked for with resource=OPAQUE_RESOURCE (introspection).
// Refresh tokens rotate. Claims for row-level security come from CONFIG.accounts (users) and
// CONFIG.client_claims (client-credentials clients) through extraTokenClaims.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

const JWT_RESOURCE = 'urn:gprxy:jwt';
const OPAQUE_RESOURCE = 'urn:gprxy:opaque';

const modules = process.env.GPRXY_NODE_MODULES;
if (!modules) {
  console.error('provider: GPRXY_NODE_MODULES is not set');
  process.exit(2);
}
const entry = path.join(modules, 'oidc-provider', 'lib', 'index.js');
const { default: Provider } = await import(pathToFileURL(entry).href);

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
// A private_key_jwt client may name its public key as PEM (`public_key_pem`, with `alg`): it is
// registered as the client's key set (jwks), as a client's registration would publish it.
for (const client of config.clients ?? []) {
  if (client.public_key_pem) {
    const jwk = crypto.createPublicKey(client.public_key_pem).export({ format: 'jwk' });
    client.jwks = { keys: [{ ...jwk, alg: client.token_endpoint_auth_signing_alg, use: 'sig' }] };
    delete client.public_key_pem;
  }
}
const accounts = config.accounts ?? {};
const clientClaims = config.client_claims ?? {};
const ttlByClient = config.access_token_ttl_by_client ?? {};
const defaultTtl = config.access_token_ttl ?? 300;

// Signing keys, newest first: oidc-provider signs with the first key of the algorithm asked for.
const keys = [];
let signingAlg = config.signing_alg ?? 'RS256';
let keySerial = 0;

function newKey(alg) {
  const kinds = {
    RS256: ['rsa', { modulusLength: 2048 }],
    ES256: ['ec', { namedCurve: 'P-256' }],
    EdDSA: ['ed25519', {}],
  };
  const kind = kinds[alg];
  if (!kind) throw new Error(`unsupported signing algorithm ${alg}`);
  const { privateKey } = crypto.generateKeyPairSync(kind[0], kind[1]);
  keySerial += 1;
  return { ...privateKey.export({ format: 'jwk' }), kid: `${alg.toLowerCase()}-${keySerial}`, alg, use: 'sig' };
}

// ID tokens are RS256 (the default), so an RS256 key is always there.
keys.push(newKey(signingAlg));
if (signingAlg !== 'RS256') keys.push(newKey('RS256'));
// CONFIG.encryption_key: an RSA-OAEP encryption key is published too (as providers that take
// encrypted request objects do); a verifier must pass over it.
if (config.encryption_key) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  keys.push({ ...privateKey.export({ format: 'jwk' }), kid: 'enc-1', alg: 'RSA-OAEP', use: 'enc' });
}

const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
const counts = {};
const server = http.createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

function claimsOf(token) {
  if (token.accountId) return accounts[token.accountId];
  return clientClaims[token.clientId];
}

function ttl(_ctx, token, client) {
  return ttlByClient[client?.clientId ?? token.clientId] ?? defaultTtl;
}

function build() {
  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys },
    cookies: { keys: cookieKeys },
    findAccount: (_ctx, id) => ({
      accountId: id,
      claims: () => ({ sub: id, ...(accounts[id]?.email ? { email: accounts[id].email } : {}) }),
    }),
    claims: { openid: ['sub'], email: ['email'] },
    scopes: ['openid', 'offline_access'],
    extraTokenClaims: (_ctx, token) => claimsOf(token),
    issueRefreshToken: (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: true,
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      RefreshToken: () => 3600,
      DeviceCode: () => 600,
      Grant: () => 3600,
      Interaction: () => 600,
      Session: () => 3600,
      IdToken: () => 300,
    },
    features: {
      devInteractions: { enabled: true },
      // An encryption key is of use only with encryption on (oidc-provider refuses it otherwise).
      encryption: { enabled: Boolean(config.encryption_key) },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // CONFIG.default_resource = false and use_granted_resource = false play a provider
        // configured without them (clients must then send `resource` themselves).
        defaultResource: (_ctx, _client, oneOf) => {
          if (oneOf) return oneOf[0];
          return config.default_resource === false ? undefined : JWT_RESOURCE;
        },
        useGrantedResource: () => config.use_granted_resource !== false,
        getResourceServerInfo: (_ctx, resource) => {
          const common = { scope: 'db:read db:write', audience: config.audience, accessTokenTTL: defaultTtl };
          if (resource === JWT_RESOURCE) {
            return { ...common, accessTokenFormat: 'jwt', jwt: { sign: { alg: signingAlg } } };
          }
          if (resource === OPAQUE_RESOURCE) {
            return { ...common, accessTokenFormat: 'opaque' };
          }
          throw new Provider.errors.InvalidTarget();
        },
      },
    },
  });
  // RFC 8628's default polling interval is 5 s; the tests' clients may poll every second.
  provider.on('device_authorization.success', (_ctx, body) => { body.interval = 1; });
  provider.on('server_error', (_ctx, err) => { console.error('provider: server_error', err); });
  return provider.callback();
}

let handler = build();
// Milliseconds the token endpoint waits before it answers (POST /delay): a slow issuer.
let tokenDelay = 0;
server.on('request', (req, res) => {
  const p = new URL(req.url, issuer).pathname;
  counts[p] = (counts[p] ?? 0) + 1;
  // Which token requests authenticated the client with HTTP Basic (client_secret_basic; the
  // provider takes a secret in the header or in the form from any secret client).
  if (p === '/token' && /^basic /i.test(req.headers.authorization ?? '')) {
    counts['/token:basic'] = (counts['/token:basic'] ?? 0) + 1;
  }
  if (p === '/token' && tokenDelay > 0) {
    const h = handler;
    setTimeout(() => h(req, res), tokenDelay);
  } else {
    handler(req, res);
  }
});

// The control listener: POST /rotate?alg=ES256 (a new signing key first in the key set; the
// older keys stay published), POST /retire (only the newest key stays), POST /delay?ms=N (the
// token endpoint answers N ms late), GET /counts (requests per path, and `/token:basic`: token
// requests with HTTP Basic client authentication).
const control = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  const answer = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  try {
    if (req.method === 'POST' && url.pathname === '/rotate') {
      signingAlg = url.searchParams.get('alg') ?? signingAlg;
      keys.unshift(newKey(signingAlg));
      handler = build();
      answer(200, { kid: keys[0].kid });
    } else if (req.method === 'POST' && url.pathname === '/retire') {
      keys.splice(1);
      if (keys[0].alg !== 'RS256') keys.push(newKey('RS256'));
      handler = build();
      answer(200, { kids: keys.map((k) => k.kid) });
    } else if (req.method === 'POST' && url.pathname === '/delay') {
      tokenDelay = Number(url.searchParams.get('ms') ?? 0);
      answer(200, { ms: tokenDelay });
    } else if (req.method === 'GET' && url.pathname === '/counts') {
      answer(200, counts);
    } else {
      answer(404, { error: 'not found' });
    }
  } catch (e) {
    console.error('provider: control', e);
    answer(500, { error: String(e) });
  }
});
await new Promise((resolve) => { control.listen(0, '127.0.0.1', resolve); });

process.stdout.write(`${JSON.stringify({ port, control_port: control.address().port, issuer })}\n`);
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));
