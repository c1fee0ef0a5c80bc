// panva's oidc-provider (OpenID-certified) as a client_credentials authorization
// server for tokensvc's interop tests. Loopback only, in-memory, http or https.
//
//   OIDC_PROVIDER_CONFIG='{"clients": [...], "ttl": 60}' node provider.mjs [port]
//
// port: argv[2], else $PORT, else 0 (the OS picks a free one). Once listening it
// prints one JSON line to stdout, {"issuer": "http://127.0.0.1:PORT", "port": PORT},
// and nothing else goes to stdout. It exits on SIGTERM/SIGINT and, with
// OIDC_PROVIDER_WATCH_STDIN=1, when its stdin reaches end of file, so that it
// never outlives the test process holding the other end of that pipe.
//
// Config (JSON in $OIDC_PROVIDER_CONFIG):
//   clients: oidc-provider client metadata, passed as is but for "scope", e.g.
//     {"client_id": "c1", "client_secret": "s", "token_endpoint_auth_method": "client_secret_basic",
//      "grant_types": ["client_credentials"], "response_types": [], "scope": "read write"}
//     {"client_id": "c2", "token_endpoint_auth_method": "private_key_jwt",
//      "token_endpoint_auth_signing_alg": "ES256", "jwks": {"keys": [<public JWK>]}, ...}
//     "scope" is taken out of the metadata (oidc-provider would accept only its
//     OpenID scopes there) and is what the client may get at any resource
//     (default "read write"); other requested scopes are dropped from the token.
//   ttl: lifetime of client_credentials access tokens, seconds (default 60).
//   tls: {"cert": PEM, "key": PEM, "client_ca": PEM}: serve https (the issuer is
//     then https://127.0.0.1:PORT) and ask every client for a certificate, for
//     RFC 8705 client authentication: tls_client_auth clients need one that
//     client_ca signed, with the registered tls_client_auth_subject_dn (one CN)
//     or tls_client_auth_san_dns; self_signed_tls_client_auth clients one whose
//     x5c is in their registered jwks.
//
// Access tokens: a client_credentials request with resource=<absolute http(s) URL
// on a loopback host> gets an RS256 JWT (typ at+jwt) whose aud is that URL, signed
// by the key published at jwks_uri. Any other resource is invalid_target.

import { createPrivateKey, generateKeyPairSync, randomUUID } from 'node:crypto';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(process.env.OIDC_PROVIDER_CONFIG || '{}');
const clients = (config.clients ?? []).map(({ scope, ...metadata }) => metadata);
const ttl = config.ttl ?? 60;
const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);

// A fresh signing key per run; oidc-provider publishes its public half at /jwks.
// Generated as PEM and exported to JWK from a key object of its own: exporting
// the generated key object itself can deadlock Node 20 at startup (a garbage
// collection during the export finalizes the key generation job, which locks
// the key's mutex the export already holds).
const { privateKey: privatePem } = generateKeyPairSync('rsa', {
  modulusLength: 2048,
  publicKeyEncoding: { type: 'spki', format: 'pem' },
  privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
});
const privateKey = createPrivateKey(privatePem);
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };

// The scopes each client may get at a resource server.
const clientScopes = new Map((config.clients ?? []).map((c) => [c.client_id, c.scope ?? 'read write']));

// RFC 8705: the certificate the client presented in this request's TLS handshake.
const peerCertificate = (ctx) => ctx.req.socket.getPeerX509Certificate?.() ?? undefined;
const mTLS = {
  enabled: Boolean(config.tls),
  tlsClientAuth: true,
  selfSignedTlsClientAuth: true,
  certificateBoundAccessTokens: false,
  getCertificate: peerCertificate,
  // Chain verified against client_ca by Node (rejectUnauthorized is off so that
  // self-signed certificates reach the self_signed_tls_client_auth check).
  certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
  certificateSubjectMatches: (ctx, property, expected) => {
    const cert = peerCertificate(ctx);
    if (property === 'tls_client_auth_subject_dn') return cert?.subject === expected;
    if (property === 'tls_client_auth_san_dns') {
      return (cert?.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
    }
    return false;
  },
};

const tls = config.tls;
const server = tls
  ? createHttpsServer({
    cert: tls.cert, key: tls.key, ca: tls.client_ca, requestCert: true, rejectUnauthorized: false,
  })
  : createHttpServer();
server.listen(port, '127.0.0.1', () => {
  // The issuer has to name the bound port, so the provider is built only now;
  // nobody knows the port before the line below is printed, so no request is lost.
  const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: [signingKey] },
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    clientAuthMethods: [
      'client_secret_basic', 'client_secret_post', 'private_key_jwt',
      ...(tls ? ['tls_client_auth', 'self_signed_tls_client_auth'] : []),
    ],
    enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'PS256', 'ES256'] },
    features: {
      devInteractions: { enabled: false }, // no login UI: nothing here needs a user
      clientCredentials: { enabled: true },
      mTLS,
      resourceIndicators: {
        enabled: true,
        // No resource parameter: no resource server, so an opaque token.
        defaultResource: () => undefined,
        getResourceServerInfo: (ctx, resource, client) => {
          const url = URL.parse(resource);
          if (!url || !['http:', 'https:'].includes(url.protocol) || !LOOPBACK.has(url.hostname)) {
            throw new errors.InvalidTarget('resource must be an http(s) URL on a loopback host');
          }
          return {
            audience: resource, // aud is the resource exactly as requested (RFC 8707)
            scope: clientScopes.get(client.clientId) ?? '',
            accessTokenFormat: 'jwt',
            accessTokenTTL: ttl,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: { ClientCredentials: ttl },
  });
  provider.on('server_error', (ctx, error) => console.error('server_error', error));
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer, port: server.address().port })}\n`);
});

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (process.env.OIDC_PROVIDER_WATCH_STDIN === '1') {
  process.stdin.on('end', stop);
  process.stdin.resume();
}
