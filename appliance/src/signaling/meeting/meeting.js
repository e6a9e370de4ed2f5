// The talkbox meeting page. It joins a stand-alone room through the built-in backend
// (/api/v1/rooms/{id}/join gives a hello-v2 token), then speaks the spreed signaling protocol on
// /spreed exactly as a Talk client does with an SFU ("MCU") present:
//   hello v2 -> room join -> one RTCPeerConnection per published stream ("video", "screen"),
//   offered to our own session; subscriptions by "requestoffer" to each participant in the call,
//   whose offers come from the SFU; trickle ICE and mute state through signaling.
// Speaking indicators come from an audio level meter on each tile's audio track.
// The page state is in document.body.dataset.state: loading, start, join, connecting, joined,
// left, error; dataset.published is set once the camera offer has been sent. call.notes keeps
// the last signaling errors and failed media steps (for support and for the browser tests).
'use strict';

const $ = (id) => document.getElementById(id);

const call = {
  roomId: '',
  grant: null,
  ws: null,
  me: '',              // our signaling session id
  nextId: 1,
  pending: new Map(),  // request id -> {resolve, reject}
  peers: new Map(),    // session id -> {name, inCall, tiles: {video, screen}, subs: {video, screen}}
  pubs: {},            // roomType -> RTCPeerConnection
  pubSids: {},         // roomType -> sid of the publisher
  local: null,         // camera/microphone MediaStream
  screen: null,        // screen MediaStream
  audioOn: true,
  videoOn: true,
  meters: new Map(),   // tile element -> analyser
  audioCtx: null,
  notes: [],           // last problems seen: {at, what, detail}
};

function note(what, detail) {
  call.notes.push({ at: Date.now(), what, detail: String(detail) });
  if (call.notes.length > 50) call.notes.shift();
  console.warn(what, detail);
}

function setState(s, text) {
  document.body.dataset.state = s;
  if (text !== undefined) $('status').textContent = text;
}

function show(id) {
  for (const s of ['create-form', 'join-form', 'call', 'left']) $(s).hidden = s !== id;
}

// How long one GET may take before it is given up and retried: a request
// whose connection stalls (lost on a flaky link, or a socket the browser opened ahead and
// the path then lost) would otherwise leave the page "loading" with no word why.
const API_TIMEOUT_MS = 10000;
const API_GET_ATTEMPTS = 3;

async function api(method, path, body) {
  const attempts = method === 'GET' ? API_GET_ATTEMPTS : 1;
  let r = null;
  for (let i = 1; r === null; i++) {
    const abort = new AbortController();
    // Only GETs are given up and repeated: a POST may have taken effect without an answer.
    const timer = method === 'GET' ? setTimeout(() => abort.abort(), API_TIMEOUT_MS) : null;
    try {
      r = await fetch(path, {
        method,
        headers: body ? { 'Content-Type': 'application/json' } : {},
        body: body ? JSON.stringify(body) : undefined,
        signal: abort.signal,
      });
    } catch (e) {
      const why = e.name === 'AbortError' ? `no answer within ${API_TIMEOUT_MS / 1000} s` : e.message;
      note(`${method} ${path} failed (attempt ${i} of ${attempts})`, why);
      if (i >= attempts) throw new Error(`The server did not answer (${method} ${path}: ${why}).`);
    } finally {
      if (timer !== null) clearTimeout(timer);
    }
  }
  let v = null;
  try { v = await r.json(); } catch (_) { /* no body */ }
  if (!r.ok) {
    const msg = (v && v.error && v.error.message) || `HTTP ${r.status}`;
    const e = new Error(msg);
    e.code = v && v.error && v.error.code;
    throw e;
  }
  return v;
}

// ---- start page ------------------------------------------------------------------------------

function startPage() {
  show('create-form');
  setState('start', '');
  $('create-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const room = await api('POST', '/api/v1/rooms', {
        name: $('create-name').value,
        password: $('create-password').value || null,
      });
      localStorage.setItem(`talkbox.moderator.${room.id}`, room.moderator_key);
      location.href = room.link;
    } catch (e) {
      setState('start', e.message);
    }
  });
}

// ---- room page -------------------------------------------------------------------------------

async function roomPage(roomId) {
  call.roomId = roomId;
  $('rejoin').href = location.pathname;
  try {
    const info = await api('GET', `/api/v1/rooms/${encodeURIComponent(roomId)}`);
    $('title').textContent = info.name;
    $('join-title').textContent = `Join “${info.name}”`;
    $('join-password-label').hidden = !info.password;
  } catch (e) {
    if (e.code !== 'no_such_room') throw e;
    $('join-title').textContent = 'Start this meeting';
  }
  $('join-name').value = localStorage.getItem('talkbox.name') || '';
  show('join-form');
  setState('join', '');
  $('join-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    join().catch((e) => {
      $('join-button').disabled = false;
      $('join-error').textContent = e.message;
      setState('join', '');
    });
  });
}

async function join() {
  $('join-button').disabled = true;
  $('join-error').textContent = '';
  const name = $('join-name').value.trim();
  localStorage.setItem('talkbox.name', name);
  const grant = await api('POST', `/api/v1/rooms/${encodeURIComponent(call.roomId)}/join`, {
    displayname: name,
    password: $('join-password').value || null,
    moderator_key: localStorage.getItem(`talkbox.moderator.${call.roomId}`),
  });
  if (grant.moderator_key) {
    localStorage.setItem(`talkbox.moderator.${call.roomId}`, grant.moderator_key);
  }
  call.grant = grant;
  setState('connecting', 'Connecting…');
  await connect();
}

// ---- signaling -------------------------------------------------------------------------------

function send(msg) {
  if (call.ws && call.ws.readyState === WebSocket.OPEN) call.ws.send(JSON.stringify(msg));
}

function request(msg) {
  const id = String(call.nextId++);
  msg.id = id;
  return new Promise((resolve, reject) => {
    call.pending.set(id, { resolve, reject });
    send(msg);
  });
}

function sendMessage(to, data) {
  const id = String(call.nextId++);
  send({ id, type: 'message', message: { recipient: { type: 'session', sessionid: to }, data } });
  return id;
}

function sendToRoom(data) {
  send({ type: 'message', message: { recipient: { type: 'room' }, data } });
}

function connect() {
  return new Promise((resolve, reject) => {
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/spreed`;
    const ws = new WebSocket(url);
    call.ws = ws;
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(m, resolve, reject);
    };
    ws.onclose = () => {
      if (document.body.dataset.state === 'joined') {
        setState('error', 'The connection to the server was lost.');
        teardown();
        show('left');
      }
      reject(new Error('The server closed the connection.'));
    };
    ws.onerror = () => reject(new Error('Cannot reach the signaling server.'));
  });
}

async function onFrame(m, resolve, reject) {
  const waiter = m.id && call.pending.get(m.id);
  if (waiter) {
    call.pending.delete(m.id);
    if (m.type === 'error') waiter.reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
    else waiter.resolve(m);
    return;
  }
  switch (m.type) {
    case 'welcome': {
      const features = m.welcome.features || [];
      call.sfu = features.includes('mcu');
      try {
        const h = await request({ type: 'hello', hello: { version: '2.0', auth: { url: call.grant.url, params: { token: call.grant.token } } } });
        call.me = h.hello.sessionid;
        await request({ type: 'room', room: { roomid: call.grant.roomid, sessionid: call.grant.sessionid } });
        await joined();
        resolve();
      } catch (e) {
        reject(e);
      }
      break;
    }
    case 'event': onEvent(m.event); break;
    case 'message': onMessage(m.message); break;
    case 'error': onError(m); break;
    case 'bye': setState('left', `Disconnected (${m.bye.reason || 'bye'}).`); break;
    default: break;
  }
}

function onError(m) {
  // Subscriptions and pushed offers retry: the publisher may not have published yet.
  const retry = call.retries && m.id && call.retries.get(m.id);
  note(`signaling error${retry ? ` (${retry.kind} ${retry.roomType}, ${retry.left} retries left)` : ''}`,
    m.error && `${m.error.code}: ${m.error.message}`);
  if (retry) {
    call.retries.delete(m.id);
    const again = retry.kind === 'sendoffer' ? sendOffer : requestOffer;
    if (retry.left > 0) setTimeout(() => again(retry.peer, retry.roomType, retry.left - 1), 1000);
  }
}

function onEvent(e) {
  if (e.target === 'room' && e.type === 'join') {
    for (const j of e.join) {
      if (j.sessionid === call.me) continue;
      const p = peer(j.sessionid);
      p.name = (j.user && j.user.displayname) || 'Guest';
      // Newcomers learn our mute state the way Talk clients tell it: a message to them.
      if (call.local && !call.audioOn) sendMessage(j.sessionid, { type: 'mute', payload: { name: 'audio' } });
      for (const t of Object.values(p.tiles)) t.querySelector('.name').textContent = labelOf(p, t.dataset.roomType);
    }
  } else if (e.target === 'room' && e.type === 'leave') {
    for (const sid of e.leave) dropPeer(sid);
  } else if (e.target === 'participants' && e.type === 'update') {
    const u = e.update;
    if (u.all) {
      if (!u.incall) for (const sid of [...call.peers.keys()]) dropSubscriptions(sid);
      return;
    }
    for (const user of u.users || []) {
      if (user.sessionId === call.me) continue;
      const p = peer(user.sessionId);
      const was = p.inCall;
      p.inCall = user.inCall || 0;
      if ((p.inCall & 1) && !(was & 1)) requestOffer(user.sessionId, 'video', 5);
      if (!(p.inCall & 1) && (was & 1)) dropSubscriptions(user.sessionId);
    }
  }
}

// ---- media: publishing -----------------------------------------------------------------------

function iceServers() {
  return (call.grant && call.grant.ice_servers) || [];
}

async function joined() {
  show('call');
  setState('joined', 'In the meeting');
  document.title = `${$('title').textContent} – talkbox`;
  try {
    // 960x540 is the smallest size for which Chromium sends all three simulcast layers (it
    // drops the top one below that).
    call.local = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: { ideal: 960 }, height: { ideal: 540 } } });
  } catch (e) {
    try {
      call.local = await navigator.mediaDevices.getUserMedia({ audio: true });
      call.videoOn = false;
    } catch (_) {
      call.local = null;
      call.audioOn = false;
      call.videoOn = false;
      $('status').textContent = 'In the meeting (no camera or microphone)';
    }
  }
  const self = tile(call.me, 'video', true);
  self.querySelector('.name').textContent = `${call.grant && $('join-name').value} (you)`;
  if (call.local) {
    attach(self, call.local, true);
  }
  updateButtons();
  const flags = 1 | (call.local && call.local.getAudioTracks().length ? 2 : 0) | (call.videoOn ? 4 : 0);
  await api('POST', `/api/v1/rooms/${encodeURIComponent(call.roomId)}/incall`, { sessionid: call.grant.sessionid, incall: flags });
  if (call.local) await publish('video', call.local);
}

// Simulcast layers of the camera, lowest first (the rids tell the SFU their order).
const SIMULCAST = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 100000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 300000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 900000 },
];

// `?codec=h264` (or vp8, vp9, av1) on the room link puts that codec first in the camera's
// offer, e.g. for devices that decode H264 in hardware; the SFU takes what the offer prefers.
function preferCodec(transceiver) {
  const want = (new URLSearchParams(location.search).get('codec') || '').toLowerCase();
  if (!want || !transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
  const all = RTCRtpSender.getCapabilities('video').codecs;
  const first = all.filter(c => c.mimeType.toLowerCase() === 'video/' + want);
  if (first.length === 0) { note('codec', `${want} is not supported by this browser`); return; }
  transceiver.setCodecPreferences([...first, ...all.filter(c => !first.includes(c))]);
}

async function publish(roomType, stream) {
  const pc = new RTCPeerConnection({ iceServers: iceServers(), bundlePolicy: 'max-bundle' });
  call.pubs[roomType] = pc;
  const sid = String(Date.now()) + roomType;
  call.pubSids[roomType] = sid;
  for (const track of stream.getTracks()) {
    if (track.kind === 'video' && roomType === 'video') {
      // Camera video as three simulcast layers (quarter, half, full resolution); the SFU
      // forwards to each participant the one its bandwidth carries.
      const tr = pc.addTransceiver(track, { direction: 'sendonly', streams: [stream], sendEncodings: SIMULCAST });
      preferCodec(tr);
    } else {
      pc.addTrack(track, stream);
    }
  }
  pc.onicecandidate = (ev) => {
    const c = ev.candidate;
    sendMessage(call.me, {
      to: call.me, type: 'candidate', roomType, sid,
      payload: { candidate: c ? { candidate: c.candidate, sdpMLineIndex: c.sdpMLineIndex, sdpMid: c.sdpMid } : { candidate: '' } },
    });
  };
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  sendMessage(call.me, {
    to: call.me, type: 'offer', roomType, sid,
    payload: { type: 'offer', sdp: offer.sdp, nick: $('join-name').value },
  });
  if (roomType === 'video') document.body.dataset.published = 'offer-sent';
}

// ---- media: subscribing ----------------------------------------------------------------------

function requestOffer(sessionId, roomType, retries) {
  if (!call.sfu) return;
  const p = call.peers.get(sessionId);
  if (!p || p.subs[roomType]) return;
  call.retries = call.retries || new Map();
  const id = sendMessage(sessionId, { type: 'requestoffer', roomType });
  call.retries.set(id, { kind: 'requestoffer', peer: sessionId, roomType, left: retries });
}

// Pushes our stream to a participant (the SFU offers it to them), as Talk does for screens.
function sendOffer(sessionId, roomType, retries) {
  if (!call.sfu || !call.pubs[roomType]) return;
  const p = call.peers.get(sessionId);
  if (!p || !(p.inCall & 1)) return;
  call.retries = call.retries || new Map();
  const id = sendMessage(sessionId, { type: 'sendoffer', roomType });
  call.retries.set(id, { kind: 'sendoffer', peer: sessionId, roomType, left: retries });
}

async function onMessage(msg) {
  const d = msg.data || {};
  const from = (msg.sender && msg.sender.sessionid) || d.from;
  const roomType = d.roomType === 'screen' ? 'screen' : 'video';
  switch (d.type) {
    case 'answer': {
      const pc = call.pubs[roomType];
      if (pc && from === call.me) {
        document.body.dataset.answered = roomType;
        await pc.setRemoteDescription({ type: 'answer', sdp: d.payload.sdp }).catch((e) => note(`answer (${roomType})`, e));
      }
      break;
    }
    case 'offer':
      await subscribe(from, roomType, d).catch((e) => note(`offer from ${from} (${roomType})`, e));
      break;
    case 'candidate': {
      const pc = from === call.me ? call.pubs[roomType] : (call.peers.get(from) || { subs: {} }).subs[roomType];
      const c = d.payload && d.payload.candidate;
      if (pc && c && c.candidate) await pc.addIceCandidate(c).catch((e) => note(`candidate (${roomType})`, e));
      break;
    }
    case 'mute':
    case 'unmute': {
      const p = call.peers.get(from);
      if (p && d.payload && d.payload.name === 'audio') {
        p.muted = d.type === 'mute';
        const t = p.tiles.video;
        if (t) t.querySelector('.mute').hidden = !p.muted;
      }
      break;
    }
    case 'speaking':
    case 'stoppedSpeaking': {
      // From the SFU (it reads the audio level of each publisher's packets), relayed by the
      // signaling server as a message from the speaker; shown by the meter loop below.
      const p = call.peers.get(from);
      if (p) p.speaking = d.type === 'speaking';
      break;
    }
    case 'nickChanged': {
      const p = call.peers.get(from);
      if (p && d.payload && d.payload.name) {
        p.name = d.payload.name;
        for (const t of Object.values(p.tiles)) t.querySelector('.name').textContent = labelOf(p, t.dataset.roomType);
      }
      break;
    }
    default: break;
  }
}

async function subscribe(from, roomType, d) {
  const p = peer(from);
  let pc = p.subs[roomType];
  if (!pc) {
    pc = new RTCPeerConnection({ iceServers: iceServers(), bundlePolicy: 'max-bundle' });
    p.subs[roomType] = pc;
    // Audio and video of one subscription may come in different streams (or none): collect
    // every track of this connection into one stream, so the tile plays both.
    const stream = new MediaStream();
    pc.ontrack = (ev) => {
      const t = tile(from, roomType, false);
      t.querySelector('.name').textContent = labelOf(p, roomType);
      stream.addTrack(ev.track);
      attach(t, stream, false);
    };
    pc.onicecandidate = (ev) => {
      const c = ev.candidate;
      sendMessage(from, {
        to: from, type: 'candidate', roomType, sid: d.sid,
        payload: { candidate: c ? { candidate: c.candidate, sdpMLineIndex: c.sdpMLineIndex, sdpMid: c.sdpMid } : { candidate: '' } },
      });
    };
  }
  await pc.setRemoteDescription({ type: 'offer', sdp: d.payload.sdp });
  const answer = await pc.createAnswer();
  await pc.setLocalDescription(answer);
  sendMessage(from, { to: from, type: 'answer', roomType, sid: d.sid, payload: { type: 'answer', sdp: answer.sdp, nick: $('join-name').value } });
}

// ---- participants and tiles ------------------------------------------------------------------

function peer(sessionId) {
  let p = call.peers.get(sessionId);
  if (!p) {
    p = { name: 'Guest', inCall: 0, muted: false, tiles: {}, subs: {} };
    call.peers.set(sessionId, p);
  }
  return p;
}

function labelOf(p, roomType) {
  return roomType === 'screen' ? `${p.name} (screen)` : p.name;
}

function tile(sessionId, roomType, self) {
  const holder = self ? (call.selfTiles = call.selfTiles || {}) : peer(sessionId).tiles;
  if (holder[roomType]) return holder[roomType];
  const t = $('tile-template').content.firstElementChild.cloneNode(true);
  t.dataset.session = sessionId;
  t.dataset.roomType = roomType;
  if (self) t.classList.add('self');
  if (roomType === 'screen') t.classList.add('screen');
  holder[roomType] = t;
  $('grid').appendChild(t);
  return t;
}

function attach(t, stream, muted) {
  const v = t.querySelector('video');
  v.muted = muted;
  v.srcObject = stream;
  if (stream.getAudioTracks().length) meter(t, stream);
}

function meter(t, stream) {
  try {
    call.audioCtx = call.audioCtx || new AudioContext();
    const src = call.audioCtx.createMediaStreamSource(stream);
    const an = call.audioCtx.createAnalyser();
    an.fftSize = 512;
    src.connect(an);
    call.meters.set(t, an);
  } catch (e) {
    console.warn('no audio meter', e);
  }
}

// The speaking highlight: a remote camera tile lights up when the SFU says its participant
// speaks (`data-server-speaking`), or when the audio played here is loud (the only source for
// our own tile, and for a box whose SFU sends no speaking messages).
setInterval(() => {
  const buf = new Uint8Array(512);
  const loud = new Set();
  for (const [t, an] of call.meters) {
    if (!t.isConnected) { call.meters.delete(t); continue; }
    an.getByteTimeDomainData(buf);
    let peak = 0;
    for (const x of buf) peak = Math.max(peak, Math.abs(x - 128));
    if (peak > 12) loud.add(t);
  }
  for (const t of $('grid').querySelectorAll('.tile')) {
    const p = !t.classList.contains('self') && call.peers.get(t.dataset.session);
    const server = Boolean(p && p.speaking && t.dataset.roomType === 'video');
    t.dataset.serverSpeaking = server ? 'true' : 'false';
    t.classList.toggle('speaking', server || loud.has(t));
  }
}, 200);

function dropSubscriptions(sessionId) {
  const p = call.peers.get(sessionId);
  if (!p) return;
  for (const [rt, pc] of Object.entries(p.subs)) {
    pc.close();
    delete p.subs[rt];
    if (p.tiles[rt]) { p.tiles[rt].remove(); delete p.tiles[rt]; }
  }
}

function dropPeer(sessionId) {
  dropSubscriptions(sessionId);
  call.peers.delete(sessionId);
}

// ---- controls --------------------------------------------------------------------------------

function updateButtons() {
  const mic = $('toggle-mic');
  const cam = $('toggle-camera');
  const hasAudio = call.local && call.local.getAudioTracks().length > 0;
  const hasVideo = call.local && call.local.getVideoTracks().length > 0;
  mic.disabled = !hasAudio;
  cam.disabled = !hasVideo;
  mic.setAttribute('aria-pressed', String(call.audioOn && hasAudio));
  cam.setAttribute('aria-pressed', String(call.videoOn && hasVideo));
  mic.textContent = call.audioOn && hasAudio ? 'Microphone on' : 'Microphone off';
  cam.textContent = call.videoOn && hasVideo ? 'Camera on' : 'Camera off';
  const self = call.selfTiles && call.selfTiles.video;
  if (self) self.querySelector('.mute').hidden = call.audioOn;
}

$('toggle-mic').addEventListener('click', () => {
  if (!call.local) return;
  call.audioOn = !call.audioOn;
  for (const t of call.local.getAudioTracks()) t.enabled = call.audioOn;
  sendToRoom({ type: call.audioOn ? 'unmute' : 'mute', payload: { name: 'audio' } });
  updateButtons();
});

$('toggle-camera').addEventListener('click', () => {
  if (!call.local) return;
  call.videoOn = !call.videoOn;
  for (const t of call.local.getVideoTracks()) t.enabled = call.videoOn;
  sendToRoom({ type: call.videoOn ? 'unmute' : 'mute', payload: { name: 'video' } });
  updateButtons();
});

$('toggle-screen').addEventListener('click', async () => {
  const btn = $('toggle-screen');
  if (call.screen) {
    stopScreen();
    return;
  }
  try {
    call.screen = await navigator.mediaDevices.getDisplayMedia({ video: true });
  } catch (e) {
    $('status').textContent = 'Screen sharing was not started.';
    return;
  }
  call.screen.getVideoTracks()[0].addEventListener('ended', stopScreen);
  attach(tile(call.me, 'screen', true), call.screen, true);
  btn.setAttribute('aria-pressed', 'true');
  btn.textContent = 'Stop sharing';
  await publish('screen', call.screen);
  // Push the screen to everyone in the call, as Talk does with an SFU.
  for (const sid of call.peers.keys()) sendOffer(sid, 'screen', 3);
});

function stopScreen() {
  if (!call.screen) return;
  for (const t of call.screen.getTracks()) t.stop();
  call.screen = null;
  if (call.pubs.screen) { call.pubs.screen.close(); delete call.pubs.screen; }
  if (call.selfTiles && call.selfTiles.screen) { call.selfTiles.screen.remove(); delete call.selfTiles.screen; }
  sendMessage(call.me, { type: 'unshareScreen', roomType: 'screen' });
  const btn = $('toggle-screen');
  btn.setAttribute('aria-pressed', 'false');
  btn.textContent = 'Share screen';
}

$('copy-link').addEventListener('click', () => {
  navigator.clipboard.writeText(location.href).then(
    () => { $('status').textContent = 'Link copied.'; },
    () => { $('status').textContent = location.href; },
  );
});

function teardown() {
  stopScreen();
  for (const pc of Object.values(call.pubs)) pc.close();
  call.pubs = {};
  for (const sid of [...call.peers.keys()]) dropPeer(sid);
  if (call.local) for (const t of call.local.getTracks()) t.stop();
  call.local = null;
  $('grid').replaceChildren();
  call.selfTiles = {};
}

$('leave').addEventListener('click', async () => {
  setState('left', 'You left.');
  try {
    await api('POST', `/api/v1/rooms/${encodeURIComponent(call.roomId)}/incall`, { sessionid: call.grant.sessionid, incall: 0 });
  } catch (_) { /* leaving anyway */ }
  send({ type: 'room', room: { roomid: '' } });
  send({ type: 'bye', bye: {} });
  const ws = call.ws;
  call.ws = null;
  teardown();
  if (ws) ws.close();
  show('left');
});

// ---- start -----------------------------------------------------------------------------------

const m = location.pathname.match(/^\/r\/([A-Za-z0-9_-]{3,64})$/);
(m ? roomPage(m[1]) : Promise.resolve(startPage())).catch((e) => {
  setState('error', e.message);
});
