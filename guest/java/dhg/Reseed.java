package dhg;

import java.lang.reflect.Field;
import java.util.Random;
import java.util.SplittableRandom;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicLong;

/**
 * Fresh random state for Java after a snapshot restore, from a seed the host supplies.
 *
 * Every clone of a snapshot starts with the JVM's random generators in the very same state:
 * ThreadLocalRandom (behind Deephaven's random(), randomInt() and friends) keeps a seed in every
 * Thread and a shared seeder for new threads; Math.random() and new Random() have static state too.
 * SecureRandom and UUID read the kernel's generator, which the agent reseeds separately.
 * Needs --add-opens java.base/java.lang, java.base/java.util and java.base/java.util.concurrent.
 */
public final class Reseed {
    private Reseed() {
    }

    /** Reseed every generator named above; returns how many threads got a new seed. */
    public static int reseed(long seed) throws ReflectiveOperationException {
        SplittableRandom mix = new SplittableRandom(seed);

        // New threads: ThreadLocalRandom derives their seeds from a static AtomicLong.
        staticAtomicLong(ThreadLocalRandom.class, "seeder").set(mix.nextLong());
        // new Random(): seedUniquifier ^ nanoTime.
        staticAtomicLong(Random.class, "seedUniquifier").set(mix.nextLong());
        // Math.random(): one Random in a holder class.
        Class<?> holder = Class.forName("java.lang.Math$RandomNumberGeneratorHolder");
        Field rng = holder.getDeclaredField("randomNumberGenerator");
        rng.setAccessible(true);
        ((Random) rng.get(null)).setSeed(mix.nextLong());

        // Threads that already exist: their own ThreadLocalRandom seeds.
        Field tlrSeed = Thread.class.getDeclaredField("threadLocalRandomSeed");
        Field tlrSecondary = Thread.class.getDeclaredField("threadLocalRandomSecondarySeed");
        tlrSeed.setAccessible(true);
        tlrSecondary.setAccessible(true);
        ThreadGroup root = Thread.currentThread().getThreadGroup();
        while (root.getParent() != null) {
            root = root.getParent();
        }
        Thread[] threads = new Thread[root.activeCount() * 2 + 16];
        int n = root.enumerate(threads, true);
        for (int i = 0; i < n; i++) {
            tlrSeed.setLong(threads[i], mix.nextLong());
            int secondary = mix.nextInt();
            tlrSecondary.setInt(threads[i], secondary == 0 ? 1 : secondary);
        }
        return n;
    }

    private static AtomicLong staticAtomicLong(Class<?> owner, String name) throws ReflectiveOperationException {
        Field f = owner.getDeclaredField(name);
        f.setAccessible(true);
        return (AtomicLong) f.get(null);
    }
}
