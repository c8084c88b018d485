package dhg;

import io.deephaven.auth.AuthContext;
import io.deephaven.auth.AuthenticationRequestHandler;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.atomic.AtomicReference;

/**
 * Pre-shared-key logins whose key is set at run time, once per VM, by the guest agent.
 *
 * Deephaven's own PskAuthenticationHandler fixes its key in a static final field when the server
 * starts, which for us is before the snapshot: every clone would share the key. This handler holds
 * no key until {@link #setKey} is called after a restore, so the snapshot holds no secret and, until
 * then, every login is refused. It answers to the PSK handler's auth type, so Deephaven's web UI
 * ({@code /ide/?psk=KEY}) and pydeephaven ({@code auth_type=PSK_TYPE}) log in with it unchanged.
 * The key is never logged.
 */
public final class TokenAuthHandler implements AuthenticationRequestHandler {
    public static final String PSK_TYPE = "io.deephaven.authentication.psk.PskAuthenticationHandler";

    private static final AtomicReference<byte[]> KEY = new AtomicReference<>();

    /** Replace the key (null: refuse every login). */
    public static void setKey(String key) {
        KEY.set(key == null || key.isEmpty() ? null : key.getBytes(StandardCharsets.UTF_8));
    }

    /** True once a key is set. */
    public static boolean hasKey() {
        return KEY.get() != null;
    }

    private static Optional<AuthContext> check(byte[] given) {
        byte[] key = KEY.get();
        // Constant-time comparison: the time taken says nothing about how much of a guess was right.
        if (key == null || given == null || !MessageDigest.isEqual(key, given)) {
            return Optional.empty();
        }
        return Optional.of(new AuthContext.SuperUser());
    }

    @Override
    public String getAuthType() {
        return PSK_TYPE;
    }

    @Override
    public Optional<AuthContext> login(long protocolVersion, ByteBuffer payload, HandshakeResponseListener listener) {
        byte[] given = new byte[payload.remaining()];
        payload.get(given);
        return check(given);
    }

    @Override
    public Optional<AuthContext> login(String payload, MetadataResponseListener listener) {
        return check(payload == null ? null : payload.getBytes(StandardCharsets.UTF_8));
    }

    @Override
    public void initialize(String targetUrl) {
        // Deliberately silent: the PSK handler prints its key here; ours must never reach a log.
    }

    @Override
    public List<String> urls(String targetUrl) {
        return List.of(targetUrl);
    }
}
