// A real OpenID Connect provider for the SSO tests: node-oidc-provider with a login
// form that checks passwords, a groups claim and one confidential client.
//
// Configured by environment (tests/idp/conftest: the `idp` fixture):
//   IDP_PORT            port on 127.0.0.1
//   IDP_USERS_FILE      JSON {"alice": {"password", "email", "groups": [...]}}, read at
//                       every sign-in, so a test can change someone's groups between two
//   IDP_CLIENT_ID, IDP_CLIENT_SECRET, IDP_REDIRECT_URI, IDP_POST_LOGOUT_REDIRECT_URI
// Prints "ready <issuer>" once it listens.
import fs from 'node:fs';
import http from 'node:http';
import querystring from 'node:querystring';

import Provider from 'oidc-provider';

const port = Number(process.env.IDP_PORT);
const issuer = `http://127.0.0.1:${port}`;
const usersFile = process.env.IDP_USERS_FILE;
const users = () => JSON.parse(fs.readFileSync(usersFile, 'utf8'));

const CLAIMS = ['sub', 'email', 'email_verified', 'preferred_username', 'groups'];

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.IDP_CLIENT_ID,
    client_secret: process.env.IDP_CLIENT_SECRET,
    redirect_uris: [process.env.IDP_REDIRECT_URI],
    post_logout_redirect_uris: [process.env.IDP_POST_LOGOUT_REDIRECT_URI],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  // The groups go into the ID token itself, as Okta, Entra and Keycloak can be set to do.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  cookies: { keys: ['gateway-test-idp-cookie-key'] },
  features: { devInteractions: { enabled: false }, rpInitiatedLogout: { enabled: true } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, id) {
    const user = users()[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: user.email,
          email_verified: true,
          preferred_username: id,
          groups: user.groups || [],
        };
      },
    };
  },
  // A first-party client: consent is implied, as it is for an IdP's own apps.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile groups');
    grant.addOIDCClaims(CLAIMS);
    await grant.save();
    return grant;
  },
});

const page = (body) => `<!doctype html><html><head><title>Test IdP</title></head><body>${body}</body></html>`;

function loginForm(uid, error) {
  return page(`<h1>Test IdP sign-in</h1>${error ? `<p id="error">${error}</p>` : ''}
<form method="post" action="/interaction/${uid}/login">
<label>Username <input name="login" id="idp-login" autofocus></label>
<label>Password <input name="password" id="idp-password" type="password"></label>
<button type="submit" id="idp-submit">Sign in</button></form>`);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (chunk) => { data += chunk; });
    req.on('end', () => resolve(querystring.parse(data)));
    req.on('error', reject);
  });
}

const callback = provider.callback();

const server = http.createServer(async (req, res) => {
  const match = req.url.match(/^\/interaction\/([^/?]+)(\/login)?/);
  if (!match) return callback(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (match[2] && req.method === 'POST') {
      const { login, password } = await readBody(req);
      const user = users()[login];
      if (!user || user.password !== password) {
        res.writeHead(200, { 'content-type': 'text/html' });
        return res.end(loginForm(details.uid, 'Wrong username or password.'));
      }
      return provider.interactionFinished(req, res, { login: { accountId: login } }, {
        mergeWithLastSubmission: false,
      });
    }
    if (details.prompt.name === 'consent') {
      // loadExistingGrant covers consent; finish the prompt with the grant it made.
      return provider.interactionFinished(req, res, { consent: {} }, { mergeWithLastSubmission: true });
    }
    res.writeHead(200, { 'content-type': 'text/html' });
    return res.end(loginForm(details.uid));
  } catch (err) {
    res.writeHead(400, { 'content-type': 'text/plain' });
    return res.end(String(err));
  }
});

server.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
