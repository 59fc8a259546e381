// `/assets/done.js`, loaded by the gateway's `/auth/done` page ("Signed in. You can close this
// window."), where the sign-in popup of a terminal's "Sign in again" banner ends up. It tells the
// page that opened it (a hint only: that page polls /api/whoami anyway), closes the window, and
// when the browser keeps it open (not a popup, or the opener link was cut) shows a link back.
// Standalone on purpose (no imports): a few hundred bytes, served under `script-src 'self'`.

const SIGNED_IN_MESSAGE = 'tether-signed-in'; // = auth.ts

function linkBack(): void {
  if (document.getElementById('tether-back')) return;
  const p = document.createElement('p');
  const a = document.createElement('a');
  a.id = 'tether-back';
  a.href = '/';
  a.textContent = 'Back to Tether';
  p.append(a);
  document.body.append(p);
}

function run(): void {
  try {
    window.opener?.postMessage({ type: SIGNED_IN_MESSAGE }, location.origin);
  } catch {
    /* no opener, or one on another origin */
  }
  try {
    window.close();
  } catch {
    /* not ours to close */
  }
  // Still here (browsers only let scripts close windows that scripts opened): offer the way back.
  window.setTimeout(() => {
    if (!window.closed) linkBack();
  }, 250);
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', run, { once: true });
else run();
